"""Model correctness: HF parity, KV-cached decoding, batching, the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ModelConfig, ModelLoadError, load_model_config
from engine.kv_cache import KVPool
from engine.loader import load_model
from engine.runner import ForwardReq, ModelRunner
from engine.sampling import SamplingParams
from engine.tiny import TINY_HF_CONFIG, tiny_model_path
from tests.engine_driver import GREEDY, full_logits, generate_alone, generate_together

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,  # larger than HF's 0.02 so a wrong weight shows in the logits
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _hf_checkpoint(tmp_path, kind: str, shard: bool = False):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**SMALL, head_dim=32, rope_scaling=LLAMA3_ROPE)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "llama_bias_tied":
        config = transformers.LlamaConfig(**SMALL, attention_bias=True, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # HF initialises biases to zero: make them count
                param.normal_(0.0, 0.5)
    model.eval()
    model.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "1GB")
    return model


@pytest.mark.parametrize("kind", ["llama", "llama_bias_tied", "qwen2"])
def test_logits_match_transformers(tmp_path, kind):
    hf = _hf_checkpoint(tmp_path, kind, shard=(kind == "llama"))
    config, model = load_model(str(tmp_path))
    pool = KVPool.for_model(config, 256)
    ids = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = full_logits(model, pool, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ref.std() > 0.5  # the comparison is not between near-zero numbers
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_config_from_hf_families(tmp_path):
    _hf_checkpoint(tmp_path, "qwen2")
    config = load_model_config(str(tmp_path))
    assert config.attention_bias and not config.attention_out_bias
    assert config.tie_word_embeddings and config.head_dim == 16
    llama = ModelConfig.from_hf_dict({**TINY_HF_CONFIG, "rope_scaling": LLAMA3_ROPE})
    assert llama.rope_scaling is not None and llama.rope_scaling.factor == 8.0
    assert llama.eos_token_ids == (257,) and llama.context_len == 2048
    # The committed tiny folder names the built-in model too (servers report its path).
    assert load_model_config(tiny_model_path()) == load_model_config("tiny")
    assert ModelConfig.from_hf_dict(json.loads(Path(tiny_model_path(), "config.json").read_text())) == (
        load_model_config("tiny")
    )


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "gpt2"}, "not supported"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
        ({"num_key_value_heads": 3}, "multiple"),
    ],
)
def test_config_rejects_unsupported(change, words):
    with pytest.raises(ModelLoadError, match=words):
        ModelConfig.from_hf_dict({**TINY_HF_CONFIG, **change})


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(str(tmp_path / "nope"))


def test_loader_reports_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_checkpoint(tmp_path, "qwen2")
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="k_proj.bias"):
        load_model(str(tmp_path))


@pytest.fixture(scope="module")
def tiny_runner() -> ModelRunner:
    return ModelRunner.from_model_path("tiny", "cpu", max_total_num_tokens=4096, random_seed=0)


def test_cached_decoding_matches_full_recompute(tiny_runner):
    model, pool = tiny_runner.model, tiny_runner.kv_pool
    prompt = list(b"The KV cache must not change the answer")
    ids = list(prompt)
    # Prefill in uneven chunks, then decode one token at a time.
    cached, step_logits = [], []
    chunks = [ids[:5], ids[5:6], ids[6:20], ids[20:]]
    for chunk in chunks:
        new = pool.alloc(len(chunk))
        hidden = _forward(model, pool, chunk, cached, new)
        cached += new
    step_logits.append(model.compute_logits(hidden[-1:]))
    for _ in range(12):
        ids.append(int(step_logits[-1].argmax()))
        new = pool.alloc(1)
        hidden = _forward(model, pool, ids[-1:], cached, new)
        cached += new
        step_logits.append(model.compute_logits(hidden))
    pool.free(cached)
    reference = full_logits(model, pool, ids)
    cached_logits = torch.cat(step_logits)
    torch.testing.assert_close(cached_logits, reference[len(prompt) - 1 :], atol=1e-4, rtol=0)
    assert pool.num_free == pool.max_total_num_tokens


def _forward(model, pool, chunk, cached, new):
    from engine.attention import AttentionMetadata

    if len(chunk) == 1:
        meta = AttentionMetadata.build([(cached, new[0])], [], torch.device("cpu"))
    else:
        meta = AttentionMetadata.build([], [(cached, new)], torch.device("cpu"))
    return model(torch.tensor(chunk), meta, pool)


def test_batched_greedy_equals_alone(tiny_runner):
    gen = torch.Generator().manual_seed(3)
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55, 40, 17, 9, 4, 70, 27, 11]
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    max_new = [6 + (i % 5) * 2 for i in range(len(prompts))]
    alone = [generate_alone(tiny_runner, p, n) for p, n in zip(prompts, max_new)]
    # A small budget forces chunked prefill and batches mixing prefill with decode;
    # max_running staggers admission so requests join while others decode.
    together = generate_together(tiny_runner, prompts, max_new, token_budget=24, max_running=10)
    assert together == alone
    assert tiny_runner.kv_pool.num_used == 0


def test_seeded_sampling_is_batch_independent(tiny_runner):
    params = SamplingParams(temperature=0.8, top_p=0.95, sampling_seed=1234)
    prompt = list(b"sampled with a seed")
    alone = generate_alone(tiny_runner, prompt, 10, params)
    others = [list(b"other"), list(b"requests in the batch change nothing")]
    together = generate_together(tiny_runner, [others[0], prompt, others[1]], [5, 10, 7],
                                 token_budget=16, params=params)
    assert together[1] == alone
    assert generate_alone(tiny_runner, prompt, 10, params) == alone


def test_tiny_model_is_not_degenerate(tiny_runner):
    prompts = [b"Hello", b"The quick brown fox", b"1 2 3 4", "你好".encode(), b"a"]
    outputs = [generate_alone(tiny_runner, list(p), 24) for p in prompts]
    assert len({tuple(o) for o in outputs}) == len(outputs)  # prompts matter
    for out in outputs:
        assert len(set(out)) >= 4 and _longest_run(out) <= 8
    printable = sum(32 <= t < 127 or t == 10 for out in outputs for t in out)
    assert printable / sum(map(len, outputs)) > 0.9  # reads as (random) text


def _longest_run(ids: list[int]) -> int:
    best = run = 1
    for prev, cur in zip(ids, ids[1:]):
        run = run + 1 if cur == prev else 1
        best = max(best, run)
    return best


def test_tiny_weights_are_identical_in_another_process(tiny_runner):
    code = (
        "import torch; from engine.loader import load_model\n"
        "_, m = load_model('tiny')\n"
        "print(repr(sum(float(p.double().sum()) for p in m.parameters())))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    here = sum(float(p.double().sum()) for p in tiny_runner.model.parameters())
    assert float(out.stdout) == here


def test_runner_rejects_bad_batches(tiny_runner):
    with pytest.raises(ValueError, match="one slot per token"):
        tiny_runner.forward([ForwardReq([1, 2], [], [0])])
    assert tiny_runner.forward([]).next_token_ids == []


def test_runner_returns_logprobs_only_where_asked(tiny_runner):
    pool = tiny_runner.kv_pool
    a, b = pool.alloc(3), pool.alloc(2)
    out = tiny_runner.forward([
        ForwardReq([1, 2, 3], [], a, sampling_params=GREEDY, return_logprob=True),
        ForwardReq([4, 5], [], b, is_sampling=False),
    ])
    pool.free(a + b)
    assert out.next_token_ids[1] is None and out.logprobs[1] is None
    assert isinstance(out.next_token_ids[0], int) and out.logprobs[0] <= 0.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_runner):
    cuda = ModelRunner.from_model_path("tiny", "cuda", 1024, dtype="float32", random_seed=0)
    prompt = list(b"same on every device")
    assert generate_alone(cuda, prompt, 8) == generate_alone(tiny_runner, prompt, 8)
