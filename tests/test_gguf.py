"""GGUF checkpoints: a tiny random Llama written here with the `gguf` package's
GGUFWriter (q/k rows permuted as llama.cpp's converter does, one tensor Q8_0-quantized),
converted by `engine.gguf_checkpoint`, loaded by the engine and compared with a
transformers forward of the same weights; and, when the real default model is in the
cache, its logits against transformers' own GGUF loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.config import ModelLoadError, load_model_config
from engine.gguf_checkpoint import convert_gguf, unpermute_rope_rows
from engine.kv_cache import KVPool
from engine.loader import load_model
from engine.model_source import DEFAULT_FOLDER, cache_dir, default_gguf_path
from engine.tokenizer import Tokenizer
from tests.engine_driver import full_logits

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, CTX = 64, 2, 4, 2, 128, 256
HEAD_DIM = HIDDEN // HEADS
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_alphabet() -> list[str]:
    # GPT-2's printable stand-ins for the 256 byte values (what byte-level BPE vocabularies hold).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _tokens() -> list[str]:
    return SPECIALS + _byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (written out independently)."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _hf_weights(vocab: int, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.normal(0, 0.2, shape).astype(np.float32)

    w = {"model.embed_tokens.weight": rand(vocab, HIDDEN),
         "model.norm.weight": 1 + rand(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rand(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
              p + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
              p + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
              p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
              p + "mlp.gate_proj.weight": rand(INTER, HIDDEN),
              p + "mlp.up_proj.weight": rand(INTER, HIDDEN),
              p + "mlp.down_proj.weight": rand(HIDDEN, INTER),
              p + "input_layernorm.weight": 1 + rand(HIDDEN),
              p + "post_attention_layernorm.weight": 1 + rand(HIDDEN)}
    return w


def _write_gguf(path, weights: dict[str, np.ndarray], tokens: list[str]) -> dict[str, np.ndarray]:
    """Write the GGUF; returns the weights as the file holds them (Q8_0 rounding included)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CTX)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(50000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    stored = {}
    for name, w in weights.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        data = w
        if name.endswith("q_proj.weight"):
            data = _llama_cpp_permute(w, HEADS)
        elif name.endswith("k_proj.weight"):
            data = _llama_cpp_permute(w, KV_HEADS)
        if gname == "blk.0.ffn_up.weight":  # one quantized tensor: the dequantize path
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            stored[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            assert not np.array_equal(stored[name], w)  # the rounding is real
        else:
            writer.add_tensor(gname, np.ascontiguousarray(data))
            stored[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path):
    tokens = _tokens()
    weights = _write_gguf(tmp_path / "m.gguf", _hf_weights(len(tokens), request.param), tokens)
    convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    return tmp_path / "out", weights, request.param


def test_config_and_shapes_from_metadata(converted):
    folder, weights, tied = converted
    config = load_model_config(str(folder))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.intermediate_size) == (
        HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER)
    assert config.vocab_size == len(_tokens()) and config.context_len == CTX
    assert config.rope_theta == 50000.0 and config.rms_norm_eps == pytest.approx(1e-5)
    assert config.tie_word_embeddings is tied and config.eos_token_ids == (2,)
    from safetensors.numpy import load_file
    files = load_file(str(folder / "model.safetensors"))
    assert {k: v.shape for k, v in files.items()} == {k: v.shape for k, v in weights.items()}


def test_logits_equal_a_transformers_forward_of_the_same_weights(converted):
    folder, weights, tied = converted
    hf_config = transformers.LlamaConfig(
        vocab_size=len(_tokens()), hidden_size=HIDDEN, intermediate_size=INTER,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=CTX, rms_norm_eps=1e-5, rope_theta=50000.0,
        tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()},
                                             strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    config, model = load_model(str(folder))
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    ours = full_logits(model, KVPool.for_model(config, 128), ids.tolist())
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert ref.std() > 0.5
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_unpermute_undoes_llama_cpp_and_is_needed():
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)  # 3 heads of head_dim 8
    permuted = _llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 3), w)


def test_tokenizer_round_trip_merges_and_specials(converted):
    folder = converted[0]
    tok = Tokenizer.from_folder(folder)
    tokens = _tokens()
    assert tok.encode("hello world", add_special_tokens=False) == [
        tokens.index("hello"), tokens.index("Ġwo"), tokens.index("r"), tokens.index("l"),
        tokens.index("d")]
    for text in ["hello world", "héllo 12345\n\n  wörld!", "emoji 🙂 and 中文", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("pre, words", [
    ("default", ["abc", "Ġ12345", "Ġit", "'s", "Ċ", "Ċ", "ok"]),  # GPT-2's split
    ("smollm", ["abc", "Ġ", "1", "2", "3", "4", "5", "Ġit", "'s", "Ċ", "Ċ", "ok"]),
    ("llama-bpe", ["abc", "Ġ", "123", "45", "Ġit", "'s", "ĊĊ", "ok"]),  # Llama 3's
])
def test_pre_tokenizer_follows_llama_cpp_pre_name(pre, words):
    from tokenizers import Tokenizer as HFTokenizer

    from engine.gguf_checkpoint import gguf_tokenizer_files
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": _tokens(), "tokenizer.ggml.merges": MERGES}
    backend = HFTokenizer.from_str(gguf_tokenizer_files(meta)[0])
    assert [w for w, _ in backend.pre_tokenizer.pre_tokenize_str("abc 12345 it's\n\nok")] == words
    # GGUF's names for the pad and unknown tokens (not pad_token_id / unk_token_id).
    config = gguf_tokenizer_files({**meta, "tokenizer.ggml.padding_token_id": 2,
                                   "tokenizer.ggml.unknown_token_id": 0})[1]
    assert (config["pad_token"], config["unk_token"]) == (_tokens()[2], _tokens()[0])
    with pytest.raises(ModelLoadError, match="pre-tokenizer 'qwen2'"):
        gguf_tokenizer_files({**meta, "tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(ModelLoadError, match="tokenizer model 'llama'"):
        gguf_tokenizer_files({**meta, "tokenizer.ggml.model": "llama"})


def test_unsupported_gguf_is_a_named_error(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'gpt2'"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")


DEFAULT_GGUF = default_gguf_path()


@pytest.mark.skipif(not (cache_dir() / "models" / DEFAULT_FOLDER / "config.json").is_file()
                    or not DEFAULT_GGUF.is_file(),
                    reason="the default model is not cached (python -m engine.serve fetches it)")
def test_default_model_logits_equal_transformers_gguf_loading():
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(DEFAULT_GGUF.parent), gguf_file=DEFAULT_GGUF.name, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_GGUF.parent),
                                                        gguf_file=DEFAULT_GGUF.name)
    folder = str(cache_dir() / "models" / DEFAULT_FOLDER)
    tok = Tokenizer.from_folder(folder)
    messages = [{"role": "user", "content": "What is the capital of France? 12 345 héllo"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == text
    ids = tok.encode_chat(messages)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    config, model = load_model(folder)
    ours = full_logits(model, KVPool.for_model(config, 128), ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    # float32 both sides, same dequantized weights; measured 7.4e-5 on logits of std 7.9.
    torch.testing.assert_close(ours, ref, atol=5e-4, rtol=0)
