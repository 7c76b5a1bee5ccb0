"""Trains one model of the default-model pair and saves it as a Hugging Face directory.

    python3 scripts/train/train.py --config scripts/train/configs/lckv.json --out DIR
    python3 scripts/train/train.py --config scripts/train/configs/heal.json --init MODEL_DIR --out DIR

Every hyper-parameter is in the JSON config: "hf_config" (written as config.json),
"generation_config" (generation_config.json), "data" (corpus folder and tokenizer folder, as
written by train_tokenizer.py) and "train" (seed, context, batch size, steps, schedule).

Data: the training parts of the five corpus files (split rule in data.py; validation text is
never trained on), each tokenized without special tokens and joined into one stream with
<|eos|> between files. Epoch e draws a random offset in [0, context) and cuts the stream
into windows of context + 1 tokens from there, in a random order; a fraction
("bos_fraction") of the windows instead start with <|bos|> followed by the text from the
next line start, so the model sees both mid-text windows (as perplexity is measured) and
prompts that begin with <|bos|> (as generation feeds them). The order, the offsets and the
<|bos|> choice come from numpy's PCG64 seeded with "seed"; weights from torch.manual_seed.
Cyclic (LCKV) models train with the reference's iteration plan (model.py).

--init MODEL_DIR fine-tunes a saved model instead of a fresh one (the healing fine-tune of a
condensed model, docs/condense.md): config.json, the weights, the tokenizer and
generation_config.json come from MODEL_DIR, so the config file has no "hf_config" and its
"data" names only the corpus. A condensed model (layer_types, no k_proj/v_proj in the layers
that read a lower layer's K/V) trains in one parallel pass like any model without a cyclic
group. The validation loss is also measured before the first step, and the weights are saved in
the dtypes MODEL_DIR stores them in (lckv condense writes its folded q_proj and o_proj in f32),
with config.json as it was: the result loads wherever MODEL_DIR did.

Mixed precision: bf16 autocast, f32 master weights, AdamW, linear warm-up then cosine decay.
Determinism: fixed seeds and data order, deterministic algorithms where PyTorch has them
(warn_only: the cuDNN attention backward is not deterministic, so two runs may differ in
the last bits).
Prints the validation loss (the whole validation text, or its first "eval_tokens" tokens) every
"eval_every" steps and at the end, and saves config.json,
model.safetensors (bf16 unless --init), generation_config.json, the tokenizer files and train_log.json.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import data  # noqa: E402
from model import CausalLM, ModelConfig, count_parameters  # noqa: E402


def tokenize_training(tok: Tokenizer, corpus: str, eos_id: int):
    parts = []
    for name, tr, _ in data.read_splits(corpus):
        encs = tok.encode_batch(list(data.line_chunks([tr])), add_special_tokens=False)
        ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int32)
        parts.append(ids)
        parts.append(np.array([eos_id], dtype=np.int32))
    stream = np.concatenate(parts)
    # tokens that end with a newline: the next position starts a line
    V = tok.get_vocab_size()
    ends_line = np.array([tok.decode([i], skip_special_tokens=False).endswith("\n") for i in range(V)])
    line_starts = np.nonzero(ends_line[stream[:-1]])[0].astype(np.int64) + 1
    return stream, line_starts


def sample_plan(n_tokens: int, line_starts: np.ndarray, ctx: int, total: int, bos_fraction: float, seed: int):
    """Start index and <|bos|> flag of each of `total` training windows, in order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    starts, epochs = [], 0
    have = 0
    while have < total:
        off = int(rng.integers(ctx))
        k = (n_tokens - off - 1) // ctx
        s = off + ctx * rng.permutation(k)
        starts.append(s)
        have += k
        epochs += 1
    starts = np.concatenate(starts)[:total].astype(np.int64)
    bos = rng.random(total) < bos_fraction
    # <|bos|> windows: the first line start at or after the drawn start (x = [bos] + stream[s : s + ctx])
    ok = line_starts[(line_starts >= 1) & (line_starts + ctx <= n_tokens)]
    j = np.minimum(np.searchsorted(ok, starts), len(ok) - 1)
    starts = np.where(bos, ok[j] - 1, starts)
    return starts, bos, epochs


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def lr_at(step: int, t: dict) -> float:
    peak, warm, total = t["lr"], t["warmup_steps"], t["steps"]
    floor = peak * t["min_lr_ratio"]
    if step < warm:
        return peak * (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * p))


@torch.no_grad()
def validation_loss(model, val: torch.Tensor, ctx: int, batch: int) -> float:
    """Mean NLL over full windows of the validation ids (training forward, bf16)."""
    model.eval()
    n = val.numel() // ctx
    wins = val[: n * ctx].view(n, ctx)
    tot, cnt = 0.0, 0
    for i in range(0, n, batch):
        x = wins[i:i + batch]
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            logits, _ = model(x)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        tot += nll.item()
        cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt


def load_init(d: str):
    """config.json, generation_config.json (or None) and the tensors of a saved model directory."""
    with open(os.path.join(d, "config.json")) as f:
        hf = json.load(f)
    gen_file = os.path.join(d, "generation_config.json")
    gen = None
    if os.path.exists(gen_file):
        with open(gen_file) as f:
            gen = json.load(f)
    return hf, gen, load_file(os.path.join(d, "model.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", metavar="MODEL_DIR", help="fine-tune this saved model (its config, weights and tokenizer)")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="stop after this many steps (timing runs only; the schedule is unchanged)")
    a = ap.parse_args()
    t_start = time.time()
    with open(a.config) as f:
        cfg = json.load(f)
    t, d = cfg["train"], cfg["data"]
    if a.init is not None:
        if "hf_config" in cfg or "tokenizer" in d:
            sys.exit(f"{a.config}: with --init the model and its tokenizer come from {a.init}; "
                     "the config must have no \"hf_config\" and no \"data\".\"tokenizer\"")
        hf, gen_cfg, init_sd = load_init(a.init)
        tok_dir = a.init
    else:
        hf, gen_cfg, init_sd, tok_dir = cfg["hf_config"], cfg["generation_config"], None, d["tokenizer"]
    mcfg = ModelConfig.from_hf(hf)
    ctx, B, steps = t["context"], t["batch_size"], t["steps"]
    assert ctx <= hf["max_position_embeddings"]

    torch.manual_seed(t["seed"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    assert tok.get_vocab_size() == hf["vocab_size"]
    stream, line_starts = tokenize_training(tok, d["corpus"], hf["eos_token_id"])
    # "eval_tokens" (optional, for trial runs on a CPU) scores only the start of the validation text
    val_ids = tok.encode(data.validation_text(d["corpus"]), add_special_tokens=False).ids[:t.get("eval_tokens")]
    starts, bos, epochs = sample_plan(len(stream), line_starts, ctx, steps * B, t["bos_fraction"], t["seed"])
    print(f"data: {len(stream)} training tokens, {len(val_ids)} validation tokens; "
          f"{steps} steps x {B} x {ctx} = {steps * B * ctx} tokens ({steps * B * ctx / len(stream):.2f} epochs, "
          f"{epochs} shuffles); {bos.mean():.3f} of windows start with <|bos|>; "
          f"prepared in {time.time() - t_start:.1f} s", flush=True)

    stream_d = torch.from_numpy(stream.astype(np.int64)).to(dev)
    starts_d = torch.from_numpy(starts).to(dev)
    bos_d = torch.from_numpy(bos).to(dev)
    val_d = torch.tensor(val_ids, dtype=torch.long, device=dev)
    ar = torch.arange(ctx + 1, device=dev)

    model = CausalLM(mcfg)
    if init_sd is None:
        model.init_weights(t.get("init_std", 0.02))
    else:
        model.load_state_dict({k: v.float() for k, v in init_sd.items()}, strict=True)
    model.to(dev).train()
    n_params = count_parameters(model)
    print(f"model: {hf['model_type']} layer_types {hf.get('layer_types')} cyclic group {model.group}; "
          f"{n_params} parameters", flush=True)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t["lr"], betas=tuple(t["betas"]), eps=1e-8, fused=True)

    log = {"config": os.path.basename(a.config), "init": a.init and os.path.basename(os.path.normpath(a.init)),
           "parameters": n_params, "train_tokens_available": int(len(stream)),
           "validation_tokens": len(val_ids), "steps": steps, "batch_size": B, "context": ctx,
           "tokens_seen": 0, "val": []}
    run_steps = steps if a.max_steps is None else min(steps, a.max_steps)
    if init_sd is not None:
        vl = validation_loss(model, val_d, ctx, t.get("eval_batch", 256))
        log["val"].append({"step": 0, "loss": vl, "ppl": math.exp(vl)})
        print(f"validation step 0 (the --init model): loss {vl:.4f} ppl {math.exp(vl):.3f}", flush=True)
    sync()
    t_train = time.time()
    t_last, acc, acc_n = t_train, 0.0, 0
    for step in range(run_steps):
        lr = lr_at(step, t)
        for g in opt.param_groups:
            g["lr"] = lr
        s = starts_d[step * B:(step + 1) * B]
        x = stream_d[s[:, None] + ar[None, :]]
        x[:, 0] = torch.where(bos_d[step * B:(step + 1) * B], hf["bos_token_id"], x[:, 0])
        inp, tgt = x[:, :-1], x[:, 1:]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits, _ = model(inp)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        acc += loss.detach()
        acc_n += 1
        done = step + 1
        if done % t["log_every"] == 0 or done == run_steps:
            sync()
            now = time.time()
            print(f"step {done}/{steps} loss {(acc / acc_n).item():.4f} lr {lr:.2e} "
                  f"{acc_n * B * ctx / (now - t_last):.0f} tok/s elapsed {now - t_train:.1f} s", flush=True)
            t_last, acc, acc_n = now, 0.0, 0
        if done % t["eval_every"] == 0 or done == run_steps:
            vl = validation_loss(model, val_d, ctx, t.get("eval_batch", 256))
            log["val"].append({"step": done, "loss": vl, "ppl": math.exp(vl)})
            print(f"validation step {done}: loss {vl:.4f} ppl {math.exp(vl):.3f}", flush=True)
            t_last = time.time()
    sync()
    train_wall = time.time() - t_train
    log["tokens_seen"] = run_steps * B * ctx
    log["steps_run"] = run_steps
    log["train_wall_s"] = round(train_wall, 1)

    os.makedirs(a.out, exist_ok=True)
    dtype_of = {k: v.dtype for k, v in init_sd.items()} if init_sd is not None else {}
    sd = {k: v.detach().to(dtype_of.get(k, torch.bfloat16)).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
        f.write("\n")
    if gen_cfg is not None:
        with open(os.path.join(a.out, "generation_config.json"), "w") as f:
            json.dump(gen_cfg, f, indent=2)
            f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(a.out, name))
    log["total_wall_s"] = round(time.time() - t_start, 1)
    with open(os.path.join(a.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
        f.write("\n")
    final = log["val"][-1]
    print(f"final validation loss {final['loss']:.4f} ppl {final['ppl']:.3f} (bf16, training forward); "
          f"{run_steps} steps, {log['tokens_seen']} tokens, training {train_wall:.1f} s, "
          f"total {log['total_wall_s']} s; saved {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
