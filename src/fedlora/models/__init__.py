"""The model side: loaders (encoder classifier, decoder LLM), the PEFT ⇄ ``{module: LoraPair}`` bridge,
local training, the optimiser knobs and the device/precision runtime. Knows nothing of rounds or tasks."""
