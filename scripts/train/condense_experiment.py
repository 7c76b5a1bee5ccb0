"""Trains a standard model, condenses it at several fractions of K/V kept, heals a few condensed
models with a short fine-tune, and writes every figure of docs/condense.md's tables.

    python3 scripts/train/condense_experiment.py --out RESULTS_DIR
        [--config scripts/train/configs/standard-16.json | --model TRAINED_DIR]
        [--heal linear-0.5,source,share-0.5,linear-0.25] [--work .data/condense-experiment] [--trial]
        [--skip-study]

Phases, each timed:
  data    the corpus (unpacked from .data/corpus-en-pd.tar.xz when .data/corpus is missing), the
          validation text and the calibration text (data.py --write-val, --write-calib), and the
          config's tokenizer if its folder is missing (train_tokenizer.py; standard-16.json
          uses the default model's, models/default);
  train   train.py --config CONFIG (skipped with --model);
  study   scripts/reference/condense_study.py: linear and share through lckv condense and the
          engine, in each K/V cache type of --kv-dtypes (all five by default), at 75, 50, 33 and 25% of the K/V kept, and
          MiniCache's SLERP merge in the PyTorch reference; the condensed models are kept;
  heal    for each name of --heal (a condensed model <method>-<fraction>, or "source" for the
          trained model itself: the control, what the same fine-tune does to a model that lost
          nothing), train.py --config configs/heal.json --init MODEL; then the perplexity of the
          same evaluation tokens before and after, by lckv (node dist/cli.js eval-ppl on the
          study's device, f32 cache: the study's arithmetic) and by PyTorch (eval_ppl.py's functions), and
          the largest relative difference between the two.
  --skip-study leaves the study out (about 2.5 minutes at 16 layers on an H100): only the source
  can then be healed, and its "before" is lckv's perplexity of the source, measured alone.
Writes RESULTS_DIR/results.json (all figures and timings, rewritten after each phase, so a run
cut short keeps what it finished), results.md (the tables, from results.json; also
`--markdown results.json` prints them again), study.json and log.txt (everything printed).
Models stay under --work (the trained model alone is some 25 MB in bf16).
--trial runs the same steps on a tiny model for a few steps (a check of the pipeline on a CPU;
its figures mean nothing). Needs dist/ built (with CUDA for --device cuda) and Python with
torch, tokenizers, safetensors and numpy.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "scripts", "reference"))
sys.path.insert(0, HERE)

# --trial: a model of the same depth but a quarter of the width (head size 32 kept), a few steps
# of training and healing, and short texts.
TRIAL_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
               "head_dim": 32}
TRIAL_TRAIN = {"steps": 6, "batch_size": 4, "warmup_steps": 2, "log_every": 2, "eval_every": 6, "eval_tokens": 4096}
TRIAL_HEAL = {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 3, "eval_tokens": 4096}
TRIAL_TOKENS = {"max_tokens": 600, "calib_tokens": 1024}


class Run:
    """Output of every command to the terminal and to log.txt; phase timings; results.json after each phase."""

    def __init__(self, out: str):
        self.out = out
        os.makedirs(out, exist_ok=True)
        self.log = open(os.path.join(out, "log.txt"), "w", encoding="utf-8")
        self.results = {"timings_s": {}}

    def say(self, line: str):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        self.log.write(line + "\n")
        self.log.flush()

    def cmd(self, args, capture=False):
        """Runs args from the repository root; returns its stdout when capture (stderr still goes to the log)."""
        self.say("$ " + " ".join(args))
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if not capture else subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if capture:
            stdout, stderr = p.communicate()
            for line in stderr.splitlines():
                self.say(line)
        else:
            stdout = ""
            for line in p.stdout:
                self.say(line.rstrip("\n"))
            p.wait()
        if p.returncode != 0:
            raise SystemExit(f"failed (exit status {p.returncode}): {' '.join(args)}")
        return stdout

    def phase(self, name: str, fn):
        self.say(f"== {name}")
        t0 = time.time()
        value = fn()
        self.results["timings_s"][name] = round(time.time() - t0, 1)
        self.say(f"== {name}: {self.results['timings_s'][name]} s")
        self.save()
        return value

    def save(self):
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.results, f, indent=2)
            f.write("\n")
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(markdown(self.results))


def derived_config(src: str, dst: str, model=None, train=None):
    with open(src) as f:
        cfg = json.load(f)
    if model:
        cfg["hf_config"].update(model)
    if train:
        cfg["train"].update(train)
    with open(dst, "w") as f:
        json.dump(cfg, f, indent=2)
    return dst


def lckv_perplexity(run, model, text, max_tokens, device):
    """lckv's perplexity with f32 weights and cache on the study's device: the arithmetic of the
    study's own figures (the "before" of a healed model), so before and after compare like with like."""
    out = run.cmd(["node", "dist/cli.js", "eval-ppl", "--model", model, "--text", text, "--window", "256",
                   "--max-tokens", str(max_tokens), "--dtype", "f32", "--kv-dtype", "f32", "--device", device, "--json"],
                  capture=True)
    return json.loads(out)["perplexity"]


def torch_perplexity(run, model, text, max_tokens):
    """eval_ppl.py's perplexity (f32, one pass: a condensed model reads no higher layer), in this process."""
    from eval_ppl import prepare, score

    m, groups, dev, _ = prepare(model, text, 256, max_tokens)
    assert m.group is None, f"{model}: a model of the study reads no higher layer"
    ppl = score(m, groups, "single-pass", dev, 512)["perplexity"]
    run.say(f"PyTorch (eval_ppl.py) {model}: perplexity {ppl:.4f}")
    return ppl


def study_entry(study, name, results):
    """What the study measured of "source" or "<method>-<fraction>": its engine perplexity (f32
    cache), layer_types (None for the source) and a label such as "linear, 8/16 (50%)". Without a
    study (--skip-study), the source's perplexity measured alone."""
    if study is None:
        return results["source"]["lckv_f32"], None, "source (control)"
    L = study["layers"]
    if name == "source":
        return study["source"]["engine"]["f32"], None, f"source, {L}/{L} (control)"
    method, fraction = name.rsplit("-", 1)
    row = next(r for r in study["rows"] if r["fraction"] == float(fraction))
    label = f"{method}, {row['kept']}/{L} ({round(100 * row['kept'] / L)}%)"
    return row[method]["perplexity"]["f32"], row[method]["layer_types"], label


def markdown(res):
    from condense_study import markdown_table, pct  # noqa: E402

    lines = []
    tr = res.get("train")
    if tr:
        last = tr["val"][-1]
        lines += [f"Model: {tr['config']}, {tr['parameters']} parameters; {tr['steps_run']} steps, {tr['tokens_seen']} tokens; "
                  f"training {tr['train_wall_s']} s, train.py in all {tr['total_wall_s']} s; final validation loss "
                  f"{last['loss']:.4f} (perplexity {last['ppl']:.3f}; bf16 training forward, {tr['validation_tokens']} "
                  "validation tokens in windows of the training context).", ""]
    st = res.get("study")
    if st:
        lines += [f"Perplexity on the first {st['tokens']} tokens of the validation text, windows of "
                  f"{st['options']['window']} (percentages against the source with an f32 cache):", "",
                  markdown_table(st), ""]
        half = next((r for r in st["rows"] if r["kept"] * 2 == r["layers"]), None)
        if half:
            base = st["source"]["engine"]["f32"]
            lin, sh = half["linear"]["perplexity"]["f32"] / base - 1, half["share"]["perplexity"]["f32"] / base - 1
            lines += [f"At half of the K/V kept: linear loses {lin * 100:.1f}% in perplexity, share {sh * 100:.1f}%; "
                      f"linear's loss is {lin / sh:.3f} of share's.", ""]
    heal = res.get("heal")
    if heal:
        base = st["source"]["engine"]["f32"] if st else res["source"]["lckv_f32"]
        steps = heal[0]["steps"]
        lines += [f"Healing ({heal[0]['config']}: {steps} steps, {heal[0]['tokens_seen']} tokens); perplexity by lckv "
                  f"({res['options']['device']}, f32 weights and cache), percentages against the source before healing:", "",
                  "| model | layer_types | before | after healing | healing time |", "|---|---|---|---|---|"]
        for h in heal:
            lt = f"`{h['layer_types']}`" if h["layer_types"] else ""
            lines.append(f"| {h['label']} | {lt} | {h['before']['lckv']:.4f} ({pct(h['before']['lckv'], base)}) | "
                         f"{h['after']['lckv']:.4f} ({pct(h['after']['lckv'], base)}) | {h['train_wall_s']} s |")
        worst = max(max(abs(h[w]["torch"] / h[w]["lckv"] - 1) for w in ("before", "after")) for h in heal)
        lines += ["", f"lckv and PyTorch (eval_ppl.py) on these models, before and after: largest relative "
                  f"difference {worst:.2e}.", ""]
    if res.get("timings_s"):
        lines += ["Phases: " + ", ".join(f"{k} {v} s" for k, v in res["timings_s"].items()) + ".", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for results.json, results.md, study.json and log.txt")
    ap.add_argument("--config", default=os.path.join(HERE, "configs", "standard-16.json"))
    ap.add_argument("--model", help="a trained standard model: skip the training")
    ap.add_argument("--heal", default="linear-0.5,source,share-0.5,linear-0.25",
                    help="models to heal, in this order: <method>-<fraction> of the study, or source")
    ap.add_argument("--heal-config", default=os.path.join(HERE, "configs", "heal.json"))
    ap.add_argument("--work", default=os.path.join(ROOT, ".data", "condense-experiment"))
    ap.add_argument("--max-tokens", type=int, default=20000, help="evaluation tokens")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--kv-dtypes", default="f32,bf16,fp8,int8,int4",
                    help="K/V cache types the study scores linear and share in")
    ap.add_argument("--device", help="the engine's device for the study (default: cuda if PyTorch sees a GPU)")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="processes for the study (default: the cores this process may use)")
    ap.add_argument("--skip-study", action="store_true",
                    help="no study: heal only the source (the control), its before measured by lckv alone")
    ap.add_argument("--trial", action="store_true", help="a tiny model and a few steps: checks the pipeline")
    ap.add_argument("--markdown", metavar="RESULTS_JSON", help="print the tables of a results.json and exit")
    a = ap.parse_args()
    if a.markdown:
        with open(a.markdown) as f:
            sys.stdout.write(markdown(json.load(f)))
        return 0
    if not a.out:
        ap.error("--out is required")
    if a.skip_study and any(n != "source" for n in a.heal.split(",") if n):
        ap.error("--skip-study: --heal may name only source (the other models are the study's)")
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.trial:
        a.max_tokens, a.calib_tokens = TRIAL_TOKENS["max_tokens"], TRIAL_TOKENS["calib_tokens"]
    run = Run(a.out)
    run.results["options"] = vars(a)
    work = a.work
    os.makedirs(work, exist_ok=True)
    val, calib = os.path.join(work, "validation.txt"), os.path.join(work, "calib.txt")

    def data():
        corpus = os.path.join(ROOT, ".data", "corpus")
        if not os.path.isdir(corpus):
            os.makedirs(corpus)
            run.cmd(["tar", "xJf", os.path.join(ROOT, ".data", "corpus-en-pd.tar.xz"), "-C", corpus])
        run.cmd([sys.executable, "scripts/train/data.py", "--corpus", corpus, "--write-val", val, "--write-calib", calib])
        if a.model is None:
            with open(a.config) as f:
                tokenizer = os.path.join(ROOT, json.load(f)["data"]["tokenizer"])
            if not os.path.exists(os.path.join(tokenizer, "tokenizer.json")):  # standard.json's own, as run_all.sh makes it
                run.cmd([sys.executable, "scripts/train/train_tokenizer.py", "--corpus", corpus, "--out", tokenizer])

    run.phase("data", data)

    config, heal_config = a.config, a.heal_config
    if a.trial:
        config = derived_config(config, os.path.join(work, "trial-model.json"), TRIAL_MODEL, TRIAL_TRAIN)
        heal_config = derived_config(heal_config, os.path.join(work, "trial-heal.json"), None, TRIAL_HEAL)
    model = a.model
    if model is None:
        model = os.path.join(work, os.path.splitext(os.path.basename(config))[0])
        shutil.rmtree(model, ignore_errors=True)
        run.phase("train", lambda: run.cmd([sys.executable, "scripts/train/train.py", "--config", config, "--out", model]))
    if os.path.exists(os.path.join(model, "train_log.json")):
        with open(os.path.join(model, "train_log.json")) as f:
            run.results["train"] = json.load(f)
        run.save()

    condensed = os.path.join(work, "condensed")
    shutil.rmtree(condensed, ignore_errors=True)
    if a.skip_study:
        study = None
        run.results["source"] = {"lckv_f32": run.phase(
            "source perplexity", lambda: lckv_perplexity(run, model, val, a.max_tokens, a.device))}
    else:
        study_json = os.path.join(a.out, "study.json")
        run.phase("study", lambda: run.cmd([
            sys.executable, "scripts/reference/condense_study.py", "--model", model, "--calib", calib, "--text", val,
            "--fractions", "1,0.75,0.5,0.33,0.25", "--kv-dtypes", a.kv_dtypes, "--max-tokens", str(a.max_tokens),
            "--calib-tokens", str(a.calib_tokens), "--device", a.device, "--jobs", str(a.jobs), "--keep", condensed,
            "--json", study_json]))
        with open(study_json) as f:
            study = run.results["study"] = json.load(f)
    run.save()

    healed_root = os.path.join(work, "healed")
    shutil.rmtree(healed_root, ignore_errors=True)
    run.results["heal"] = []
    names = [n for n in a.heal.split(",") if n]
    unknown = [n for n in names if n != "source" and not os.path.isdir(os.path.join(condensed, n))]
    if unknown:
        raise SystemExit(f"--heal {','.join(unknown)}: not a model of the study (source, or one of "
                         f"{', '.join(sorted(os.listdir(condensed)))})")
    for name in names:
        init = model if name == "source" else os.path.join(condensed, name)
        healed = os.path.join(healed_root, name)

        def heal():
            run.cmd([sys.executable, "scripts/train/train.py", "--config", heal_config, "--init", init, "--out", healed])
            with open(os.path.join(healed, "train_log.json")) as f:
                log = json.load(f)
            before, layer_types, label = study_entry(study, name, run.results)
            entry = {"name": name, "label": label, "layer_types": layer_types, "config": os.path.basename(heal_config),
                     "steps": log["steps_run"], "tokens_seen": log["tokens_seen"], "train_wall_s": log["train_wall_s"],
                     "validation_loss": {"before": log["val"][0]["loss"], "after": log["val"][-1]["loss"]},
                     "before": {"lckv": before, "torch": torch_perplexity(run, init, val, a.max_tokens)},
                     "after": {"lckv": lckv_perplexity(run, healed, val, a.max_tokens, a.device),
                               "torch": torch_perplexity(run, healed, val, a.max_tokens)}}
            run.say(f"{name}: perplexity {before:.4f} -> {entry['after']['lckv']:.4f} (lckv), "
                    f"{entry['before']['torch']:.4f} -> {entry['after']['torch']:.4f} (PyTorch)")
            run.results["heal"].append(entry)

        run.phase(f"heal {name}", heal)
    run.say("")
    run.say(markdown(run.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
