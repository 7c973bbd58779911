"""What a run writes for people: readable plots, a portable adapter with its model card, tracker logs.

One 2-round toy run (FedEx-LoRA, so frozen weights are merged and the snippet's base-weights branch
runs) is shared by the tests that need real outputs; the plot tests use synthetic metrics.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import matplotlib
import pytest
import torch

from fedlora.config.run import ConfigError, RunConfig
from fedlora.config.run import check_trackers as check_targets
from fedlora.runs.trackers import check_installed, flatten, open_trackers
from fedlora.runs.model_card import MINILM_HUB_ID, portable_reference

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedlora.engines.local import run

    out = tmp_path_factory.mktemp("outputs") / "toy-run"
    config = RunConfig(task="toy", method="fedex-lora", rounds=2, clients=2, alpha=0.5, local_steps=1, batch_size=4,
                       max_length=24, max_eval_examples=16, eval_local_every=1, max_local_eval_examples=8,
                       log_to="tensorboard", out=str(out))
    run(config, progress=False)
    return out


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_adapter_records_the_hub_id_and_loads_elsewhere_with_its_cards_snippet(toy_run, tmp_path, monkeypatch):
    from fedlora.runs.adapter_files import load_model_with_adapter

    adapter_config = json.loads((toy_run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == MINILM_HUB_ID  # not a path into this virtualenv
    card = (toy_run / "adapter" / "README.md").read_text()
    assert all(word in card for word in ("toy", "fedex-lora", "2 clients", "fedlora run --task toy", "accuracy"))

    # Move the run to another folder (the original location is gone) and run the card's snippet there, as written.
    elsewhere = tmp_path / "other-machine"
    shutil.copytree(toy_run, tmp_path / "staging" / toy_run.name)
    shutil.move(tmp_path / "staging", elsewhere)
    snippet = re.search(r"```python\n(.*?)```", card, re.S)
    assert snippet is not None, "the model card has no python snippet"
    monkeypatch.chdir(elsewhere)
    namespace: dict = {}
    exec(snippet.group(1), namespace)  # noqa: S102 - the README's own code, run as a user would
    moved, tokenizer = namespace["model"], namespace["tokenizer"]

    reference, _ = load_model_with_adapter(toy_run / "adapter")  # the run's model, at its original place
    batch = tokenizer(["the plot was dreadful.", "honestly, the cast felt superb."], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(moved(**batch).logits, reference(**batch).logits)
    assert moved.peft_config["default"].base_model_name_or_path == MINILM_HUB_ID


def test_tensorboard_events_hold_every_round_metric_under_the_jsonl_names(toy_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(toy_run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    records = _records(toy_run)
    for record in records:
        for name, value in flatten(record).items():
            assert name in scalars, name
            logged = {e.step: e.value for e in events.Scalars(name)}
            assert math.isclose(logged[record["round"]], value, rel_tol=1e-6), name
    assert {"global_metric", "divergence", "global/accuracy"} <= scalars
    assert any(tag.startswith("local_metric/") for tag in scalars)  # per client, as in metrics.jsonl


def test_trackers_fail_in_one_line_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="tensorbord: unknown tracker; use any of tensorboard, wandb, mlflow"):
        check_targets("tensorbord")
    assert check_targets("tensorboard,wandb") == check_targets("tensorboard wandb") == ("tensorboard", "wandb")
    config = RunConfig(log_to="tensorboard,mlflow")
    assert RunConfig.from_json(config.to_json()) == config  # config.json round-trips (resume compares configs)
    for name in ("wandb", "mlflow"):
        try:
            __import__(name)
        except ImportError:
            message = f"the {name} package is not installed; pip install {name}"
            with pytest.raises(ConfigError, match=message):
                open_trackers([name], tmp_path, "{}")
            with pytest.raises(ConfigError, match=message):
                check_installed([name])


def test_flatten_keeps_jsonl_names_and_drops_what_is_not_a_number():
    record = {"round": 3, "global": {"accuracy": 0.5}, "local_metric": {"client-0": 0.7}, "divergence": 0.1,
              "clients": ["client-0"], "skipped": False, "local_metric_mean": None}
    assert flatten(record) == {"global/accuracy": 0.5, "local_metric/client-0": 0.7, "divergence": 0.1}


def test_a_given_model_is_recorded_as_given_and_the_bundled_one_by_its_hub_id():
    from fedlora.models.classifier import default_model_path

    assert portable_reference(default_model_path(), None)[0] == MINILM_HUB_ID
    assert portable_reference("/somewhere/else", "my-org/my-model") == (
        "my-org/my-model", "--model my-org/my-model as given (Hugging Face hub id)")


def _captured_figures(monkeypatch) -> list:
    figures: list = []
    original = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        fig.canvas.draw()
        figures.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figures


def _write_run(path: Path, method: str, divergences: list[float]) -> Path:
    path.mkdir(parents=True)
    config = json.loads(RunConfig(task="toy", method=method, rounds=3, clients=4, alpha=0.1, seed=7).to_json())
    (path / "config.json").write_text(json.dumps(config))
    records = [{"round": t, "global_metric": 0.5 + 0.1 * t, "divergence": d, "eckart_young_bound": d / 3,
                "bytes_up": 1, "bytes_down": 1, "server_seconds": 0.1, "wall_seconds": 1.0, "local_metric_mean": None}
               for t, d in enumerate(divergences, 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_three_round_plot_has_integer_rounds_a_title_and_labelled_log_ticks(tmp_path, monkeypatch):
    from fedlora.reporting.curves import plot_runs

    figures = _captured_figures(monkeypatch)
    runs = [_write_run(tmp_path / "a", "fedit", [0.3, 0.01, 0.002]), _write_run(tmp_path / "b", "flora", [0.0, 0.0, 0.0])]
    plot_runs(runs, tmp_path / "plots")
    assert len(figures) == 2
    for fig in figures:
        ax = fig.axes[0]
        low, high = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if low <= t <= high]
        assert shown and all(float(t).is_integer() for t in shown), shown
        assert "toy" in ax.get_title() and "4 clients" in ax.get_title() and "α=0.1" in ax.get_title()
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert len(labels) >= 2, labels
    divergence = figures[1].axes[0]
    assert divergence.get_yscale() == "log"
    lines = [line for line in divergence.get_lines() if len(line.get_xdata())]
    assert len({(line.get_color(), line.get_marker()) for line in lines if line.get_linestyle() == "-"}) == 2
    assert sum(line.get_linestyle() == "--" for line in lines) == 2  # each method's SVD bound


def test_every_preset_label_has_its_own_colour_and_marker():
    from fedlora.bench.plots import _known_labels, method_style

    styles = {(str(method_style(label)["color"]), method_style(label)["marker"]) for label in _known_labels()}
    assert len(styles) == len(_known_labels())
    assert method_style("fedit [alpha=0.1]") == method_style("fedit")



def test_progress_says_run_k_of_n_and_rescales_the_eta_by_the_measured_speed():
    from fedlora.cli.progress import RunProgress

    lines: list[str] = []
    progress = RunProgress([10.0, 10.0, 20.0], log=lines.append)
    assert progress.remaining_seconds() == 40.0
    progress.start(0, "fedit")
    progress.finish(0, "fedit", seconds=20.0)  # twice as slow as estimated: the rest will be too
    assert progress.remaining_seconds() == 60.0
    assert lines[0].startswith("[run 1 of 3] fedit: estimated 10 s; overall 40 s left, ETA ")
    assert "done in 20 s (estimate 10 s); 1/3 done, overall 60 s left" in lines[1] and "2x the estimate" in lines[1]
    assert RunProgress([10.0, 30.0], log=lines.append, workers=2).remaining_seconds() == 20.0


def test_demo_prints_its_plan_and_run_k_of_n_before_running(monkeypatch, capsys, tmp_path):
    import fedlora.cli.commands as cli
    import fedlora.engines.local as simulation

    ran: list[str] = []
    monkeypatch.setattr(simulation, "run", lambda config, **kwargs: ran.append(config.method))
    monkeypatch.setattr(cli, "compare_runs", lambda runs, out: 0)
    monkeypatch.chdir(tmp_path)  # the demo locks and marks its run directories under --out
    assert cli.main(["demo", "--rounds", "3", "--out", "unused"]) == 0
    out = capsys.readouterr().out
    assert "will run 2 runs on sst2: flora-na-stable, fedit; 3 rounds, 10 clients, α=0.5" in out
    assert "estimated" in out.splitlines()[1] and "2-core" in out
    assert "[run 1 of 2] flora-na-stable" in out and "[run 2 of 2] fedit" in out and "ETA" in out
    assert ran == ["flora-na-stable", "fedit"]


def test_bench_grid_prints_its_plan_and_an_overall_eta(tmp_path):
    from fedlora.bench.grid import expand, run_jobs, select
    from fedlora.bench.presets import get_preset

    preset = select(get_preset("quick"), ["sst2"], None, [0])
    jobs = expand(preset, tmp_path, None)
    lines: list[str] = []
    run_jobs(jobs, 0.35, runner=lambda config, **kwargs: None, log=lines.append)
    assert lines[0].startswith(f"will run {len(jobs)} runs on sst2: ")
    assert all(v.method in lines[0] for v in preset.methods)
    assert any(line.startswith(f"[run 1 of {len(jobs)}]") and "ETA" in line for line in lines)
    assert lines[-1].endswith("all done")


def test_the_bundled_smollm2_is_recorded_by_its_hub_id(tmp_path):
    from fedlora.models.decoder import DEFAULT_MODEL
    from fedlora.runs.model_card import SMOLLM2_HUB_ID

    converted = tmp_path / f"{DEFAULT_MODEL}-c73d7e50c92c"  # where fedlora.models.decoder dequantises the GGUF
    converted.mkdir()
    assert portable_reference(str(converted), None)[0] == SMOLLM2_HUB_ID
    assert portable_reference(str(converted), str(converted))[0] == str(converted)  # --model given: as given


def test_the_model_cards_command_rebuilds_the_runs_config() -> None:
    """The card's `fedlora run ...` line, typed again, is the same experiment (task, method and seed always named)."""
    import shlex

    from fedlora.cli.commands import build_parser, config_from_args
    from fedlora.config.run import RunConfig
    from fedlora.runs.model_card import command_line

    config = RunConfig(task="toy", method="flora-na", rounds=2, clients=3, alpha=None, target_modules=("query",),
                       method_options={"solver": "adamw"}, lr_schedule="cosine", out="runs/card")
    words = shlex.split(command_line(config))
    assert words[:2] == ["fedlora", "run"] and {"--task", "--method", "--seed"} <= set(words)
    assert config_from_args(build_parser().parse_args(words[1:])) == config


def test_the_model_card_escapes_what_it_quotes_and_names_no_local_path(tmp_path) -> None:
    """A run folder's name and option values cannot break the card's Python or Markdown (issue 21, item 18),
    and the card, published with the adapter, holds no absolute path of this machine."""
    import ast
    import shlex

    import yaml
    from markdown_it import MarkdownIt

    from fedlora.runs.model_card import write_model_card

    name = 'run "q" \\ \' `tick` ``x``\n# injected *em* [link](x) <b>|'
    data, model, adapter = tmp_path / "data", tmp_path / "my-model", tmp_path / "adapter"
    for folder in (data, model, adapter):
        folder.mkdir()
    config = RunConfig(task="toy", out=str(tmp_path / name), data_dir=str(data), model=str(model))
    card = write_model_card(adapter, config, [{"round": 1, "global": {"main": 0.5, "acc|*x*": 0.25}}],
                            str(model), f"--model {model} as given (local checkpoint)").read_text()
    assert str(tmp_path) not in card

    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front)["base_model"] == "my-model"
    snippet = re.search(r"```python\n(.*?)```", body, re.S)
    assert snippet is not None
    assigned = {n.targets[0].id: n.value.value for n in ast.parse(snippet.group(1)).body  # type: ignore[attr-defined]
                if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)}
    assert assigned["adapter"] == f"{name}/adapter"  # the Python snippet names the run exactly

    markdown = MarkdownIt("commonmark").enable("table")
    tokens = [t for block in markdown.parse(body) for t in [block, *(block.children or [])]]
    assert [t.tag for t in tokens if t.type == "heading_open"] == ["h1", "h2", "h2"]  # nothing injected
    assert not [t.type for t in tokens if t.type in ("link_open", "em_open", "html_inline", "html_block")]
    code = [t.content for t in tokens if t.type == "code_inline"]
    assert name.replace("\n", "\\n") in code  # the name as one code span, newline shown escaped
    command = shlex.split(next(c for c in code if c.startswith("fedlora run")))
    assert command[command.index("--out") + 1] == name.replace("\n", "\\n")  # its folder's name, not a path
    assert command[command.index("--data-dir") + 1] == "data" and command[command.index("--model") + 1] == "my-model"
    assert "<td>acc|*x*</td>" in markdown.render(body)  # a metric name stays one table cell, literally


# --- plots say what they show; the demo says where its outputs are; the LLM card says how data was split ---

def _write_llm_run(path: Path, exact_match: list[float], loss: list[float], token_accuracy: list[float]) -> Path:
    """A synthetic `--task instruct --exact-match` run: exact match flat at 0 while loss and token accuracy move."""
    path.mkdir(parents=True)
    config = json.loads(RunConfig(task="instruct", exact_match=True, rounds=len(loss), clients=4, alpha=0.5).to_json())
    (path / "config.json").write_text(json.dumps(config))
    records = [{"round": t, "global_metric": em, "divergence": 0.1, "eckart_young_bound": 0.05, "bytes_up": 1,
                "bytes_down": 1, "server_seconds": 0.1, "wall_seconds": 1.0, "local_metric_mean": None,
                "global": {"loss": lo, "perplexity": math.exp(lo), "token_accuracy": ta, "exact_match": em, "main": em}}
               for t, (em, lo, ta) in enumerate(zip(exact_match, loss, token_accuracy), 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_an_llm_run_plots_each_metric_under_its_own_name_on_a_nonnegative_axis(tmp_path, monkeypatch):
    from fedlora.reporting.curves import plot_run

    figures = _captured_figures(monkeypatch)
    run = _write_llm_run(tmp_path / "run", [0.0, 0.0, 0.0], [2.1, 1.7, 1.5], [0.40, 0.45, 0.47])
    written = plot_run(run)
    assert [p.name for p in written] == ["global_exact_match.png", "global_loss.png", "global_token_accuracy.png",
                                         "divergence.png"]
    assert not (run / "accuracy.png").exists() and all(p.stat().st_size > 0 for p in written)
    for fig, name, ys in zip(figures, ("exact_match", "loss", "token_accuracy"),
                             ([0.0] * 3, [2.1, 1.7, 1.5], [0.40, 0.45, 0.47])):
        ax = fig.axes[0]
        assert ax.get_ylabel() == f"global {name}"  # what is plotted, not the registered token_accuracy
        assert list(ax.get_lines()[0].get_ydata()) == ys
        assert ax.get_ylim()[0] >= 0, f"{name}'s axis runs negative: {ax.get_ylim()}"


def test_a_signed_metric_keeps_its_negative_axis_and_a_glue_run_plots_its_metric_only(tmp_path, monkeypatch):
    from fedlora.reporting.curves import plot_runs

    figures = _captured_figures(monkeypatch)
    run = _write_run(tmp_path / "cola", "fedit", [0.3, 0.2, 0.1])
    config = json.loads((run / "config.json").read_text()) | {"task": "cola"}
    (run / "config.json").write_text(json.dumps(config))
    records = [json.loads(line) | {"global_metric": 0.0} for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # the majority class: MCC 0
    written = plot_runs([run], tmp_path / "plots", prefix="compare_")
    assert [p.name for p in written] == ["compare_global_matthews_correlation.png", "compare_divergence.png"]
    assert figures[0].axes[0].get_ylabel() == "global matthews_correlation"
    assert figures[0].axes[0].get_ylim()[0] < 0  # a correlation can be negative: its axis may say so


def test_compare_shows_the_local_column_only_when_a_run_measured_it(tmp_path):
    from fedlora.reporting.curves import compare_table

    runs = [_write_run(tmp_path / "a", "fedit", [0.3, 0.2, 0.1]), _write_run(tmp_path / "b", "svd", [0.0, 0.0, 0.0])]
    header, _, row, _ = compare_table(runs).splitlines()
    assert "local" not in header and header.count("|") == row.count("|")  # every column filled
    records = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    records[-1]["local_metric_mean"] = 0.75
    (runs[1] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = compare_table(runs).splitlines()
    assert "local (last)" in lines[0] and "| – |" in lines[2] and "| 0.7500 |" in lines[3]


def test_the_demo_ends_saying_where_its_table_runs_and_adapters_are(monkeypatch, capsys, tmp_path):
    import fedlora.cli.commands as cli
    import fedlora.engines.local as simulation

    def fake_run(config, **kwargs):  # what a real run leaves: config.json, metrics.jsonl, adapter/
        _write_run(Path(config.out + ".src"), config.method, [0.2, 0.1, 0.05])
        for name in ("config.json", "metrics.jsonl"):
            (Path(config.out) / name).write_text((Path(config.out + ".src") / name).read_text())
        (Path(config.out) / "adapter").mkdir()

    monkeypatch.setattr(simulation, "run", fake_run)
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--rounds", "3", "--out", "demo"]) == 0
    out = capsys.readouterr().out
    tail = out[out.index("demo outputs"):]
    assert (tmp_path / "demo" / "compare.md").is_file() and "demo/compare.md" in tail
    for method in ("flora-na-stable", "fedit"):
        assert f"demo/{method}/ " in tail and f"demo/{method}/adapter/ " in tail
    assert "local" not in (tmp_path / "demo" / "compare.md").read_text()  # the demo never evaluates locally


@pytest.mark.parametrize("task, skew, alpha, expected", [
    ("gsm8k", "auto", 0.5, "quantity skew: client sizes ~ Dirichlet(α = 0.5), rows IID"),  # no key: auto = quantity
    ("sst2", "quantity", 0.1, "quantity skew: client sizes ~ Dirichlet(α = 0.1), rows IID"),
    ("sst2", "auto", 0.5, "Dirichlet α = 0.5"),
    ("gsm8k", "auto", None, "IID split"),
])
def test_the_model_card_says_how_the_clients_data_was_split(tmp_path, task, skew, alpha, expected):
    from fedlora.runs.model_card import write_model_card

    config = RunConfig(task=task, skew=skew, alpha=alpha, out=str(tmp_path / "run"))
    card = write_model_card(tmp_path, config, [], "base", "as loaded").read_text()
    assert f"clients ({expected}, share per round" in card
    assert ("Dirichlet α" in card) == (expected == "Dirichlet α = 0.5")


def test_the_base_record_of_a_causal_lm_has_no_classifier_head_fields():
    from types import SimpleNamespace

    from fedlora.runs.adapter_files import base_meta

    head = SimpleNamespace(num_labels=2, problem_type=None)  # what transformers' config says for any model
    llm = base_meta("CAUSAL_LM", head, "HuggingFaceTB/SmolLM2-135M-Instruct", "/x", "as loaded", [])
    assert "num_labels" not in llm and "problem_type" not in llm and llm["task_type"] == "CAUSAL_LM"
    classifier = base_meta("SEQ_CLS", SimpleNamespace(num_labels=1, problem_type="regression"), "m", "/x", "as", [])
    assert (classifier["num_labels"], classifier["problem_type"]) == (1, "regression")


def test_overwrite_removes_the_per_metric_plots_and_nothing_else(tmp_path):
    from fedlora.runs.run_dir import claim, refuse_existing, remove_outputs

    out = tmp_path / "run"
    out.mkdir()
    for name in ("global_exact_match.png", "global_loss.png", "divergence.png", "notes.png"):
        (out / name).write_bytes(b"png")
    with pytest.raises(ConfigError, match="holds divergence.png, global_exact_match.png, global_loss.png"):
        refuse_existing(out, overwrite=True)  # not a fedlora run: its plot-named files are not ours to delete
    claim(out)
    remove_outputs(out)
    assert sorted(p.name for p in out.iterdir()) == [".fedlora-run", "notes.png"]
