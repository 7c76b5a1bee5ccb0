#!/usr/bin/env python3
"""Build the tiny random test models and their golden outputs.

    python scripts/reference/make_fixtures.py --out test/fixtures

Every fixture is a Hugging Face style directory (config.json, safetensors
weights, tokenizer.json, tokenizer_config.json, sometimes
generation_config.json) plus golden.json, computed by lckv_reference.py in
float64 from the weights as stored on disk.  Everything is seeded; run on CPU.
See README.md next to this file for what each fixture covers.
"""

import argparse
import inspect
import json
import os
import random
import shutil
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lckv_reference import Config, Reference, check_against_transformers, forward_unfolded, self_test  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Public domain: Jane Austen, "Pride and Prejudice" (1813), chapter 1.
TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.

"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from the north of England; that he came down on Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to be in the house by the end of next week."
"""

BOS, EOS = "<|bos|>", "<|eos|>"  # ids 0 and 1 (trained first)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PROMPT_LEN, GREEDY_PROMPT_LEN, GREEDY_NEW = 16, 8, 32


def r7(x):
    """Round to 7 significant digits."""
    return float(f"{float(x):.7g}")


# ----------------------------------------------------------------------------
# fixture definitions
# ----------------------------------------------------------------------------

def llama_config(vocab, hidden, layers, heads, kv_heads, inter, tied, dtype, theta=10000.0, scaling=None,
                 eps=1e-5, max_pos=128, lckv=None):
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": max_pos,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": eps,
        "rope_scaling": scaling,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab,
    }
    if lckv is not None:
        cfg["architectures"] = ["LCKVLlamaForCausalLM"]
        cfg["model_type"] = "lckv-llama"
        cfg.update({"layer_types": None, "forward_passes": 7, "backward_passes": 2, "sliding_window": 4096,
                    "use_sequential": False, "force_nodiag": False})
        cfg.update(lckv)
    return cfg


def gpt2_config(vocab, hidden, layers, heads, inner, n_positions, dtype, lckv=None):
    cfg = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.0,
        "bos_token_id": 0,
        "embd_pdrop": 0.0,
        "eos_token_id": 1,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": n_positions,
        "n_embd": hidden,
        "n_head": heads,
        "n_inner": inner,
        "n_layer": layers,
        "n_positions": n_positions,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab,
    }
    if lckv is not None:
        cfg.update(lckv)
    return cfg


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}

FIXTURES = [
    dict(name="llama-mha-hd16", seed=1, build="hf", dtype="float32", chat_template=True,
         generation_config={"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.7,
                            "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 32},
         config=llama_config(288, 64, 3, 4, 4, 32, True, "float32")),
    dict(name="llama-gqa-hd32", seed=2, build="hf", dtype="bfloat16",
         config=llama_config(300, 64, 4, 2, 1, 32, False, "bfloat16", theta=500000.0, scaling=LLAMA3_SCALING,
                             max_pos=256)),
    dict(name="llama-sharded-f16", seed=3, build="hand", dtype="float16", shards=2,
         config=llama_config(272, 32, 3, 4, 2, 64, False, "float16", theta=50000.0, eps=1e-6)),
    dict(name="gpt2", seed=4, build="hf", dtype="float32",
         config=gpt2_config(301, 64, 3, 4, 96, 128, "float32")),
    dict(name="gpt2-lckv", seed=5, build="hand", dtype="float32",
         config=gpt2_config(280, 32, 4, 4, None, 64, "float32",
                            lckv={"layer_types": "0_3_3_3", "forward_passes": 2, "backward_passes": 1})),
    dict(name="lckv-w2", seed=6, build="hand", dtype="float32",
         generation_config={"bos_token_id": 0, "eos_token_id": [1], "do_sample": False, "max_new_tokens": 32},
         config=llama_config(288, 64, 6, 4, 2, 32, True, "float32",
                             lckv={"layer_types": "0_4_4_4_4_5", "forward_passes": 3, "backward_passes": 1})),
    dict(name="lckv-cla", seed=7, build="hand", dtype="float32",
         config=llama_config(272, 32, 4, 4, 2, 64, True, "float32", eps=1e-6,
                             lckv={"layer_types": "0_0_2_2"})),
    dict(name="lckv-sandwich", seed=8, build="hand", dtype="float32",
         config=llama_config(276, 32, 7, 4, 2, 64, True, "float32",
                             lckv={"layer_types": "0_3_3_3_3_3_6", "forward_passes": 2, "backward_passes": 2})),
    dict(name="lckv-sliding", seed=9, build="hand", dtype="float32",
         config=llama_config(272, 32, 6, 4, 1, 64, True, "float32",
                             lckv={"layer_types": "0s_4s_4_4_4_5s", "sliding_window": 4,
                                   "forward_passes": 3, "backward_passes": 2})),
    dict(name="lckv-nodiag", seed=10, build="hand", dtype="float32",
         config=llama_config(264, 32, 4, 4, 4, 64, True, "float32",
                             lckv={"layer_types": "0_1_1_3", "force_nodiag": True})),
    # `lckv condense` (the engine's command, so dist/ must be built) run on a fixture above; the
    # golden is the reference on the directory it wrote.
    dict(name="condensed-llama", seed=11, build="condense", source="llama-gqa-hd32", kv_layers=2),
    dict(name="condensed-gpt2", seed=12, build="condense", source="gpt2", kv_layers=2),
]

# The folded model (what condense wrote, f32 weights) against the unfolded computation (the
# source's own weights, the fitted maps applied to the K/V explicitly), both in float64: they
# differ only by the rounding of the folded weights to f32. Bound on max |difference| over the
# largest |logit|.
UNFOLDED_TOLERANCE = 1e-6

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------

def expected_shapes(c):
    """Tensor name -> shape, in file order, for a reference Config."""
    E, V, D, I = c.hidden, c.vocab, c.head_dim, c.inner
    s = {}
    if c.style == "llama":
        s["model.embed_tokens.weight"] = (V, E)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            s[p + "input_layernorm.weight"] = (E,)
            s[p + "self_attn.q_proj.weight"] = (c.num_heads * D, E)
            if c.computes_kv[i]:
                s[p + "self_attn.k_proj.weight"] = (c.num_kv_heads * D, E)
                s[p + "self_attn.v_proj.weight"] = (c.num_kv_heads * D, E)
            s[p + "self_attn.o_proj.weight"] = (E, c.num_heads * D)
            s[p + "post_attention_layernorm.weight"] = (E,)
            s[p + "mlp.gate_proj.weight"] = (I, E)
            s[p + "mlp.up_proj.weight"] = (I, E)
            s[p + "mlp.down_proj.weight"] = (E, I)
        s["model.norm.weight"] = (E,)
        if not c.tied:
            s["lm_head.weight"] = (V, E)
    else:
        s["transformer.wte.weight"] = (V, E)
        s["transformer.wpe.weight"] = (c.max_positions, E)
        for i in range(c.num_layers):
            p = f"transformer.h.{i}."
            s[p + "ln_1.weight"] = (E,)
            s[p + "ln_1.bias"] = (E,)
            if c.computes_kv[i]:
                s[p + "attn.c_attn.weight"] = (E, 3 * E)
                s[p + "attn.c_attn.bias"] = (3 * E,)
            else:
                s[p + "attn.q_attn.weight"] = (E, E)
                s[p + "attn.q_attn.bias"] = (E,)
            s[p + "attn.c_proj.weight"] = (E, E)
            s[p + "attn.c_proj.bias"] = (E,)
            s[p + "ln_2.weight"] = (E,)
            s[p + "ln_2.bias"] = (E,)
            s[p + "mlp.c_fc.weight"] = (E, I)
            s[p + "mlp.c_fc.bias"] = (I,)
            s[p + "mlp.c_proj.weight"] = (I, E)
            s[p + "mlp.c_proj.bias"] = (E,)
        s["transformer.ln_f.weight"] = (E,)
        s["transformer.ln_f.bias"] = (E,)
    return s


def random_weights(c, seed):
    """Seeded weights (N = standard normal): norm weights 1 + 0.1 N, biases
    0.05 N, token embeddings / lm_head 0.2 N, positions 0.1 N, attention output
    projection 0.1 N, every other projection (q/k/v, MLP) 0.2 N.  Sharp
    attention and a strong, token-dependent MLP keep greedy continuations of
    these random models from collapsing into one repeated token, and make the
    upper-layer K/V matter (iterative and sequential logits differ clearly)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(c).items():
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) == 1 and name.endswith(".bias"):
            x = 0.05 * x
        elif len(shape) == 1:
            x = 1.0 + 0.1 * x
        elif name in ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight"):
            x = 0.2 * x
        elif name == "transformer.wpe.weight":
            x = 0.1 * x
        elif name.endswith(("self_attn.o_proj.weight", "attn.c_proj.weight")):
            x = 0.1 * x
        else:
            x = 0.2 * x
        out[name] = x.contiguous()
    return out


def save_safetensors(weights, out_dir, dtype, shards=1):
    from safetensors.torch import save_file

    weights = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    if shards == 1:
        save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(weights)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    groups, acc = [[] for _ in range(shards)], 0
    for n in names:
        groups[min(shards - 1, int(acc * shards // total))].append(n)
        acc += weights[n].numel() * weights[n].element_size()
    assert all(groups), "empty shard"
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in group}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")


def build_with_transformers(fx, out_dir, weights):
    """Instantiate LlamaForCausalLM / GPT2LMHeadModel, load our weights, save_pretrained."""
    cfg = dict(fx["config"])
    for k in ("architectures", "model_type", "torch_dtype", "dtype"):
        cfg.pop(k)
    if fx["config"]["model_type"] == "gpt2":
        from transformers import GPT2Config as C, GPT2LMHeadModel as M
    else:
        from transformers import LlamaConfig as C, LlamaForCausalLM as M
        if "rope_parameters" in inspect.signature(C.__init__).parameters:
            rp = dict(cfg.pop("rope_scaling") or {"rope_type": "default"})
            rp["rope_theta"] = cfg.pop("rope_theta")
            cfg["rope_parameters"] = rp
    model = M(C(**cfg)).eval()
    params = dict(model.named_parameters())
    if "lm_head.weight" in params and "lm_head.weight" not in weights:  # tied, listed twice
        emb = "model.embed_tokens.weight" if "model.embed_tokens.weight" in params else "transformer.wte.weight"
        assert params["lm_head.weight"].data_ptr() == params[emb].data_ptr(), "lm_head not tied"
        del params["lm_head.weight"]
    missing = sorted(set(params) - set(weights))
    unused = sorted(set(weights) - set(params))
    assert not missing and not unused, f"parameter names differ: missing {missing}, unused {unused}"
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    model = model.to(TORCH_DTYPES[fx["dtype"]])
    model.save_pretrained(out_dir)
    # keep both spellings of the dtype and the classic RoPE keys next to whatever
    # this transformers version wrote
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    for key in ("torch_dtype", "dtype", "rope_theta", "rope_scaling", "architectures"):
        if key in fx["config"] and saved.get(key) is None and fx["config"][key] is not None:
            saved[key] = fx["config"][key]
    write_json(path, saved)
    # tied embeddings: the file must not carry a separate lm_head.weight
    from safetensors.torch import load_file, save_file

    st = os.path.join(out_dir, "model.safetensors")
    if fx["config"]["tie_word_embeddings"] and os.path.exists(st):
        tensors = load_file(st)
        if "lm_head.weight" in tensors:
            del tensors["lm_head.weight"]
            save_file(tensors, st, metadata={"format": "pt"})
            print(f"note: dropped a saved copy of the tied lm_head.weight in {os.path.basename(out_dir)}")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------

def train_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


def write_tokenizer(tok, out_dir, max_len, chat_template):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": max_len,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template:
        cfg["chat_template"] = CHAT_TEMPLATE
    write_json(os.path.join(out_dir, "tokenizer_config.json"), cfg)


def word_starts():
    first_par = TEXT.split("\n\n")
    starts, offset = [], 0
    for par in first_par:
        if "\n" not in par.strip():
            starts += [offset + k for k in range(len(par)) if par[k] != " " and (k == 0 or par[k - 1] == " ")]
        offset += len(par) + 2
    return starts


def find_prompt(tok, n_tokens, start):
    """The shortest substring of TEXT from `start` that encodes to exactly
    n_tokens ids (so encoding the text gives back the ids)."""
    for end in range(start + 1, len(TEXT)):
        text = TEXT[start:end]
        if "\n" in text:
            return None
        ids = tok.encode(text).ids
        if len(ids) == n_tokens and not text.endswith(" "):
            return text, ids
        if len(ids) > n_tokens + 4:
            return None
    return None


# ----------------------------------------------------------------------------
# goldens
# ----------------------------------------------------------------------------

def make_golden(fx, out_dir, tok, rng, report):
    ref = Reference.from_dir(out_dir, dtype=torch.float64)
    c = ref.cfg
    starts = word_starts()

    prompt = None
    while prompt is None:
        prompt = find_prompt(tok, PROMPT_LEN, rng.choice(starts))
    text, ids = prompt
    exact = ref.forward_sequential(ids)
    golden = {
        "source": "scripts/reference/lckv_reference.py: sequential (token-by-token, exact) forward in float64 "
                  "on the weights stored in this directory",
        "vocab_size": c.vocab,
        "layer_types": c.raw.get("layer_types"),
        "prompt_text": text,
        "prompt_ids": ids,
        "logits": [r7(x) for x in exact.flatten()],
        "max_abs_logit": r7(exact.abs().max()),
    }

    span = c.upward_span()
    if span is None:
        par = ref.forward_iterative(ids)
        d = float((par - exact).abs().max())
        assert d < 1e-9, f"parallel pass differs from sequential by {d}"
        report["parallel_vs_sequential"] = d
    else:
        passes = c.forward_passes + c.backward_passes
        it = ref.forward_iterative(ids)
        first = float((it[:passes] - exact[:passes]).abs().max())
        after = float((it[passes:] - exact[passes:]).abs().max())
        assert first < 1e-9, f"iterative differs from sequential on its first {passes} positions by {first}"
        full = float((ref.forward_iterative(ids, passes=len(ids)) - exact).abs().max())
        assert full < 1e-9, f"iterative with len(prompt) passes differs from sequential by {full}"
        assert after > 1e-6, f"iterative equals sequential after {passes} positions ({after})"
        golden["iterative"] = {
            "passes": passes,
            "forward_passes": c.forward_passes,
            "backward_passes": c.backward_passes,
            "low": span[0],
            "high": span[1],
            "logits": [r7(x) for x in it.flatten()],
            "max_abs_diff_vs_sequential_after": r7(after),
        }
        report["iterative_first"] = first
        report["iterative_after"] = after
        report["iterative_per_position"] = [r7(x) for x in (it - exact).abs().max(-1).values]

    # greedy: among a few candidate prompts keep the best separated one whose
    # continuation is not a few tokens repeated and does not contain EOS
    best = None
    tried = 0
    while tried < 16:
        cand = find_prompt(tok, GREEDY_PROMPT_LEN, rng.choice(starts))
        if cand is None:
            continue
        tried += 1
        tokens, gap = ref.greedy(cand[1], GREEDY_NEW)
        score = (len(set(tokens)) >= 8 and tok.token_to_id(EOS) not in tokens, gap)
        if best is None or score > best[4]:
            best = (cand[0], cand[1], tokens, gap, score)
    golden["greedy"] = {
        "prompt_text": best[0],
        "prompt_ids": best[1],
        "tokens": best[2],
        "min_top2_gap": r7(best[3]),
        "eos_stops": False,
    }
    report["min_top2_gap"] = best[3]
    report["greedy_distinct_tokens"] = len(set(best[2]))
    report["greedy_contains_eos"] = 1 in best[2]

    # cross-check the standard patterns against transformers
    if c.targets == list(range(c.num_layers)) and not c.force_nodiag:
        report["hf_max_abs_diff"] = check_against_transformers(out_dir, ids, greedy_prompt=best[1], n_new=GREEDY_NEW)

    if fx.get("chat_template"):
        messages = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Is Netherfield Park let?"}]
        rendered = BOS + "".join(f"<|{m['role']}|>\n{m['content']}{EOS}\n" for m in messages) + "<|assistant|>\n"
        try:
            import jinja2
        except ImportError:
            jinja2 = None
        if jinja2 is not None:  # the template must render to the same text
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            assert env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True,
                                                         bos_token=BOS, eos_token=EOS) == rendered
        report["chat_template_checked_with_jinja2"] = jinja2 is not None
        golden["chat"] = {"messages": messages, "add_generation_prompt": True, "text": rendered,
                          "ids": tok.encode(rendered).ids}
    return golden


def write_golden(path, golden):
    with open(path, "w") as f:
        f.write("{\n")
        items = list(golden.items())
        for k, (key, value) in enumerate(items):
            f.write(f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
            f.write(",\n" if k + 1 < len(items) else "\n")
        f.write("}\n")


# ----------------------------------------------------------------------------

def calibration_text(seed, rounds=8):
    """Deterministic calibration text for condense: the words of TEXT in `rounds` seeded
    shuffles, one paragraph each (enough tokens for the maps of these fixtures)."""
    words = TEXT.split()
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(rounds):
        rng.shuffle(words)
        paragraphs.append(" ".join(words))
    return "\n\n".join(paragraphs) + "\n"


def build_condensed(fx, out_dir, report):
    """Runs `lckv condense` on an already built fixture, writes the golden of the result, and
    asserts that the folded model equals the unfolded computation."""
    import subprocess
    import tempfile

    from tokenizers import Tokenizer

    cli = os.path.join(ROOT, "dist", "cli.js")
    assert os.path.exists(cli), f"{cli} is missing: build the engine first (npx cmake-js compile, npx tsc)"
    src = os.path.join(os.path.dirname(out_dir), fx["source"])
    assert os.path.exists(os.path.join(src, "golden.json")), f"build the source fixture {fx['source']} first"
    shutil.rmtree(out_dir, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        calib = os.path.join(tmp, "calibration.txt")
        with open(calib, "w") as f:
            f.write(calibration_text(fx["seed"]))
        written = os.path.join(tmp, fx["name"])
        cmd = ["node", cli, "condense", os.path.relpath(src, ROOT), "--out", written, "--calib", calib,
               "--kv-layers", str(fx["kv_layers"]), "--method", "linear", "--device", "cpu", "--json"]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "LCKV_QUIET": "1"})
        assert run.returncode == 0, f"lckv condense failed: {run.stderr}"
        shutil.copytree(written, out_dir)
    with open(os.path.join(out_dir, "condense.json")) as f:
        condensed = json.load(f)
    report["layer_types"] = "_".join(map(str, condensed["layerTypes"]))
    report["held_out_perplexity"] = condensed["perplexity"]

    with open(os.path.join(out_dir, "config.json")) as f:
        c = Config(json.load(f))
    check_stored_names(c, out_dir, report)
    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    golden = make_golden(fx, out_dir, tok, random.Random(fx["seed"]), report)
    golden["source"] += f"; the model: `lckv condense {fx['source']} --kv-layers {fx['kv_layers']} --method linear`"
    write_golden(os.path.join(out_dir, "golden.json"), golden)

    ids = golden["prompt_ids"]
    folded = Reference.from_dir(out_dir, dtype=torch.float64).forward_sequential(ids)
    unfolded = forward_unfolded(Reference.from_dir(src, dtype=torch.float64),
                                os.path.join(out_dir, "condense-maps.safetensors"), ids)
    scale = float(folded.abs().max())
    rel = float((folded - unfolded).abs().max()) / scale
    assert rel <= UNFOLDED_TOLERANCE, f"folded and unfolded logits differ by {rel:.3g} of the largest logit"
    # The check has teeth: the source model itself is far from both.
    source = Reference.from_dir(src, dtype=torch.float64).forward_sequential(ids)
    report["folded_vs_unfolded"] = rel
    report["folded_vs_source"] = float((folded - source).abs().max()) / scale
    assert report["folded_vs_source"] > 100 * UNFOLDED_TOLERANCE, "condensing changed nothing measurable"
    report["bytes"] = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir))


def check_stored_names(c, out_dir, report):
    """The files on disk must follow the documented naming convention."""
    from safetensors import safe_open

    stored = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".safetensors") and name != "condense-maps.safetensors":
            with safe_open(os.path.join(out_dir, name), "pt") as f:
                for key in f.keys():
                    stored[key] = (tuple(f.get_slice(key).get_shape()), name)
    want = expected_shapes(c)
    assert set(stored) == set(want), f"stored names differ: extra {sorted(set(stored) - set(want))}, " \
                                     f"missing {sorted(set(want) - set(stored))}"
    for k, shape in want.items():
        assert stored[k][0] == shape, f"{k}: stored shape {stored[k][0]}, expected {shape}"
    report["files"] = sorted(set(v[1] for v in stored.values()))


def build_fixture(fx, out_dir, report):
    if fx["build"] == "condense":
        build_condensed(fx, out_dir, report)
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    c = Config(fx["config"])
    weights = random_weights(c, fx["seed"])
    if fx["build"] == "hf":
        build_with_transformers(fx, out_dir, weights)
    else:
        write_json(os.path.join(out_dir, "config.json"), fx["config"])
        save_safetensors(weights, out_dir, TORCH_DTYPES[fx["dtype"]], fx.get("shards", 1))

    gen_path = os.path.join(out_dir, "generation_config.json")
    if "generation_config" in fx:
        write_json(gen_path, fx["generation_config"])
    elif os.path.exists(gen_path):
        os.remove(gen_path)

    check_stored_names(c, out_dir, report)

    tok = train_tokenizer(c.vocab)
    max_len = fx["config"].get("max_position_embeddings") or fx["config"].get("n_positions")
    write_tokenizer(tok, out_dir, max_len, fx.get("chat_template", False))
    golden = make_golden(fx, out_dir, tok, random.Random(fx["seed"]), report)
    write_golden(os.path.join(out_dir, "golden.json"), golden)
    report["bytes"] = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir))

    try:  # informative only: can transformers read the tokenizer directory?
        from transformers import PreTrainedTokenizerFast

        t = PreTrainedTokenizerFast.from_pretrained(out_dir)
        report["hf_tokenizer_roundtrip"] = t(golden["prompt_text"], add_special_tokens=False)["input_ids"] == \
            golden["prompt_ids"]
    except Exception as e:  # pragma: no cover
        report["hf_tokenizer_roundtrip"] = f"error: {e!r}"[:200]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (e.g. test/fixtures)")
    ap.add_argument("--only", help="comma-separated fixture names")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else None
    failures = []
    try:
        self_test()
    except Exception:
        traceback.print_exc()
        failures.append("self-test")
    for fx in FIXTURES:
        if wanted and fx["name"] not in wanted:
            continue
        report = {}
        try:
            build_fixture(fx, os.path.join(args.out, fx["name"]), report)
            status = "ok"
        except Exception:
            status = "FAILED"
            failures.append(fx["name"])
            traceback.print_exc()
        print(f"[{status}] {fx['name']}: {json.dumps(report)}", flush=True)
    if failures:
        print("FAILED:", ", ".join(failures))
        return 1
    print("all fixtures ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
