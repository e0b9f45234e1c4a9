"""The model side of a rank: config, weights, KV pool, forward pass, sampling, tokenizer.

torch-free (safe to import in the API process and in scheduling code):
    config (ModelConfig, load_model_config), sampling (SamplingParams), finish
    (check_finish), kv_slots (KVSlotAllocator), tokenizer (Tokenizer), tiny (paths).
torch (only in a scheduler process): model, attention, rope, kv_cache, loader,
    sampler, runner, executor, device.
"""
