"""A run's folder: start/resume rules (run_dir), one run per folder (lock), trackers, the adapter files, model card, and the one owner of the files (outputs)."""
