"""
The paper's comparative findings, reproduced at toy scale on the built-in synthetic data and scored
exactly with the oracle benchmark, oracle.py (held-out colour-shape pairs never seen in training):

  1. conditioning: cross-attention vs adaLN-zero          (Table 2 rows 1-2, Fig. 4)
  2. pooled text added to the time embedding, or not       (Sec. 3.2.1, last paragraph)
  3. model scale: toy vs S, same data, steps and batch     (Fig. 5, Table 2 last row)
  4. motion-free guidance: T2V trained with p_motion_free = 0.5 and joint image-video batches,
     sampled with lambda_M in {1.0, 1.1, 1.2, 1.3}, vs one trained without the motion-free mask
                                                           (Sec. 3.3.2, Eq. 6, Fig. 8)
  Not in the paper, only when named: QK-norm (--t2i-arms cross-attn "cross-attn, QK-norm").

Every arm of a comparison gets the same budget (steps, batch, lr, seed, data order). Arms train
concurrently as separate `train_t2i.py` / `train_t2v.py` processes, spread over the visible GPUs.
The scale pair has its own, smaller budget (the S model costs about 11x the toy's FLOPs per sample, 13x its parameters).
The T2I phase ends with the baseline arm's EMA weights exported; the T2V phase starts from them.

    python experiments.py --out runs/exp                    # both phases, writes results.md/.json
    python experiments.py --out runs/exp --phase t2i        # T2I arms only (then --phase t2v later)
    python experiments.py --out runs/exp --seeds 0 1        # two seeds per T2I arm
    python experiments.py --smoke --device cpu              # minutes-long end-to-end check of the pipeline
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from checkpoint import checkpoint_step, checkpoints, export, write_json
from oracle import oracle_eval
from pipeline import load_model

PAPER_ARMS = {  # name -> extra train_t2i.py flags (the first arm is the baseline and the T2V parent)
    "cross-attn": [],
    "adaLN-zero": ["--conditioning", "adaln"],
    "cross-attn, no pooled": ["--no-pooled-text"],
}
# every arm --t2i-arms accepts: the paper's, and ours that run only when named (not in the paper)
T2I_ARMS = {**PAPER_ARMS, "cross-attn, QK-norm": ["--qk-norm"]}  # docs/bundled-models.md, "Why QK-norm"
SCALE_ARMS = {"size toy": ["--size", "toy"], "size S": ["--size", "S"]}  # cross-attn, at the scale budget
T2V_ARMS = {"MFG (p_mf=0.5)": ["--p-motion-free", "0.5"], "no motion-free (p_mf=0)": ["--p-motion-free", "0"]}
# Eq. 6 at lambda_M = 1 is plain CFG; above 1 it needs e(0, 0) with the identity temporal mask, which a p_mf = 0
# model never trained on: that arm is scored at lambda_M = 1 alone (the paper's comparison, Sec. 3.3.2, Fig. 8)
CFG_ONLY_ARMS = {"no motion-free (p_mf=0)"}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="runs/exp")
p.add_argument("--phase", default="all", choices=["t2i", "t2v", "all"])
p.add_argument("--steps", type=int, default=3000, help="T2I steps per arm")
p.add_argument("--batch-size", type=int, default=1024)
p.add_argument("--lr", type=float, default=1e-3, help="T2I arms (the toy default); the paper's 1e-4 is for 500K steps")
p.add_argument("--scale-steps", type=int, default=1500, help="steps of each arm of the scale pair (0: skip it)")
p.add_argument("--scale-batch-size", type=int, default=512)
p.add_argument("--scale-lr", type=float, default=5e-4, help="the scale pair's lr (S is less stable at 1e-3)")
p.add_argument("--t2v-steps", type=int, default=2500)
p.add_argument("--t2v-batch-size", type=int, default=64)
p.add_argument("--t2v-lr", type=float, default=5e-4)
p.add_argument("--parent", default=None, help="T2V phase: T2I run folder, ckpt or export (default: the baseline arm)")
p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"], help="of every arm (train_t2i.py)")
p.add_argument("--ema", type=float, default=0.999, help="EMA decay (a toy run is shorter than DiT's 1/(1-0.9999))")
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--n-eval", type=int, default=100, help="held-out prompts per category (T2I) / clips (T2V)")
p.add_argument("--cfg", type=float, nargs="+", default=[4.0, 7.5], help="lambda_T values for T2I scoring")
p.add_argument("--t2v-cfg", type=float, default=7.5, help="lambda_T for T2V, fixed as in Sec. 3.3.2")
p.add_argument("--mfg", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3])
p.add_argument("--num-samples", type=int, default=16, help="held-out prompts in each arm's samples.png")
p.add_argument("--workers", type=int, default=3, help="DataLoader workers per training process")
p.add_argument("--compile", action="store_true", help="torch.compile the blocks of every arm")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--export-assets", action="store_true", help="write the baseline T2I / MFG T2V EMA weights to assets/")
p.add_argument("--t2i-arms", nargs="+", default=list(PAPER_ARMS), choices=list(T2I_ARMS),
               help="T2I arms to run (the first is the T2V parent); default: the paper's comparisons")
p.add_argument("--smoke", action="store_true", help="tiny budget, to check the pipeline end to end")


def launch(script, out, flags, args, log):
    """Start one training run as its own process (its own CUDA context); returns the Popen."""
    device = "cuda:0" if args.device == "cuda" else args.device  # each process sees one GPU
    cmd = [sys.executable, script, "--out", out, "--device", device, "--ema", str(args.ema),
           "--lr-schedule", args.lr_schedule,
           "--num-workers", str(args.workers), "--log-every", "250", "--eval-n", "0", "--num-samples", str(args.num_samples),
           *(["--compile"] if args.compile else []), *flags]  # oracle scores: below, for every arm alike
    print(" ".join(cmd[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # several processes share the host's cores
    if torch.cuda.device_count() > 1:  # spread the arms over the GPUs, one process per GPU in turn
        env["CUDA_VISIBLE_DEVICES"] = str(launch.count % torch.cuda.device_count())
    launch.count += 1
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    if torch.device(args.device).type == "cpu":
        proc.wait()  # on CPU the arms would only compete for the same cores: run them one at a time
    return proc


launch.count = 0


def finished(out, steps):
    """Whether the arm in `out` has finished its `steps` steps (then it is scored, not retrained). A run of
    another length there (a --smoke run in the same --out, say) is an error: it would be scored as this one."""
    found = checkpoints(out)
    if not found:
        return False
    step = checkpoint_step(found[-1])
    if step != steps:
        raise SystemExit(f"{out} holds a run of {step} steps but this call trains {steps}: use another --out "
                         "(or remove that folder)")
    return True


def run_all(jobs):
    """Wait for every job; a failed run stops the experiment with its log's tail."""
    for name, (proc, log) in jobs.items():
        if proc.wait() != 0:
            tail = open(log).read()[-3000:]
            raise SystemExit(f"arm {name!r} failed (log {log}):\n{tail}")


def phase_t2i(args, results, t0):
    """The T2I arms (all seeds) and the scale pair, concurrently; then every arm on the same held-out
    prompts and noise seeds. The baseline arm's EMA weights are exported: the T2V parent."""
    # --patch 2 for every arm: the toy row would otherwise switch to 4x4 patches on a CPU (train_t2i.py)
    budget = ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--ckpt-every", str(args.steps),
              "--lr", str(args.lr), "--patch", "2"]
    scale = ["--max-steps", str(args.scale_steps), "--batch-size", str(args.scale_batch_size),
             "--ckpt-every", str(args.scale_steps), "--lr", str(args.scale_lr), "--seed", str(args.seeds[0]),
             "--patch", "2"]
    arms = [("conditioning", name, seed, args.steps, [*budget, "--seed", str(seed), *T2I_ARMS[name]])
            for seed in args.seeds for name in args.t2i_arms]
    if args.scale_steps:
        arms += [("scale", name, args.seeds[0], args.scale_steps, [*scale, *flags])
                 for name, flags in SCALE_ARMS.items()][::-1]
    jobs, runs = {}, {}
    for group, name, seed, steps, flags in arms:  # the scale pair last, S first: the slowest arm gets a GPU of its own
        out = os.path.join(args.out, f"t2i-{slug(name)}-s{seed}")
        runs[(group, name, seed)] = out
        if not finished(out, steps):  # an arm that already finished is scored, not retrained
            jobs[(name, seed)] = (launch("train_t2i.py", out, flags, args, out + ".log"), out + ".log")
    run_all(jobs)
    print(f"T2I arms done in {time.time() - t0:.0f}s", flush=True)
    # rows of arms not rerun here (e.g. seed 0 when this call adds --seeds 1) are kept
    results["t2i"] = [r for r in results.get("t2i", []) if (r["group"], r["arm"], r["seed"]) not in runs]
    for (group, name, seed), out in runs.items():
        model, meta = load_model(out, ema=True, device=args.device)
        for cfg in args.cfg:
            s = oracle_eval(model, meta, n_per_category=args.n_eval, seed=1000, cfg=cfg, device=args.device,
                            progress=False)
            results["t2i"].append({"group": group, "arm": name, "seed": seed, "cfg": cfg, **s})
    write(results, args, t0)
    baseline = runs[("conditioning", args.t2i_arms[0], args.seeds[0])]
    if not os.path.exists(parent_path(args)):  # the first call's baseline: T2V arms trained later start from it too
        export(baseline, parent_path(args))  # fp32 EMA weights: the T2V phase starts from them
    if args.export_assets:  # the bundled models (docs/bundled-models.md): EMA weights in fp16, < 20 MB together
        export(baseline, "assets/gentron_t2i.safetensors", dtype="fp16")


def phase_t2v(args, results, t0, parent):
    """The T2V arms from the same T2I parent (Sec. 3.3.1), scored at each lambda_M (Eq. 6)."""
    flags = ["--init-from", parent, "--max-steps", str(args.t2v_steps), "--batch-size", str(args.t2v_batch_size),
             "--ckpt-every", str(args.t2v_steps), "--lr", str(args.t2v_lr), "--seed", str(args.seeds[0])]
    jobs, runs = {}, {}
    for name, arm in T2V_ARMS.items():
        out = os.path.join(args.out, f"t2v-{slug(name)}")
        runs[name] = out
        if not finished(out, args.t2v_steps):  # an arm that already finished is scored, not retrained
            jobs[name] = (launch("train_t2v.py", out, [*flags, *arm], args, out + ".log"), out + ".log")
    run_all(jobs)
    print(f"T2V arms done in {time.time() - t0:.0f}s", flush=True)
    results["t2v"] = []
    for name, out in runs.items():
        model, meta = load_model(out, ema=True, device=args.device)
        for mfg in [1.0] if name in CFG_ONLY_ARMS else args.mfg:
            s = oracle_eval(model, meta, n_per_category=args.n_eval, seed=1000, cfg=args.t2v_cfg, mfg=mfg,
                            device=args.device, progress=False)
            results["t2v"].append({"arm": name, "mfg": mfg, **s})
    write(results, args, t0)
    if args.export_assets:
        export(runs[next(iter(T2V_ARMS))], "assets/gentron_t2v.safetensors", dtype="fp16")


def parent_path(args):
    return os.path.join(args.out, "t2i-parent.safetensors")


def main(args):
    if args.smoke:
        args.steps, args.scale_steps, args.t2v_steps, args.n_eval = 20, 10, 10, 4
        args.batch_size, args.scale_batch_size, args.t2v_batch_size = 8, 8, 4
        args.cfg, args.mfg, args.num_samples = args.cfg[:1], args.mfg[:2], 2
    os.makedirs(args.out, exist_ok=True)
    file = os.path.join(args.out, "results.json")
    results = json.load(open(file)) if os.path.exists(file) else {}  # a later phase adds to an earlier one
    # every call's flags, in order: a later call (a second seed, say) adds rows and must not erase how the
    # earlier rows were made
    results.setdefault("settings", {}).setdefault(args.phase, vars(args))  # the first call of each phase
    results.setdefault("calls", []).append({**vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    t0 = time.time()
    if args.phase in ("t2i", "all"):
        phase_t2i(args, results, t0)
    if args.phase in ("t2v", "all"):
        parent = args.parent or parent_path(args)
        if not os.path.exists(parent):
            raise SystemExit(f"T2V phase: no T2I parent at {parent}; run --phase t2i first or pass --parent")
        phase_t2v(args, results, t0, parent)


def write(results, args, t0):
    """results.json and results.md (the tables of docs/experiments.md) in --out; printed too."""
    results.setdefault("seconds", {})[args.phase] = time.time() - t0
    results.setdefault("device", {})[args.phase] = (torch.cuda.get_device_name() if torch.device(args.device).type
                                                    == "cuda" else "cpu")
    file = os.path.join(args.out, "results.json")
    write_json(file, results, default=str)  # atomic: an interrupted write never loses the earlier phase
    table = tables(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table, flush=True)


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def tables(results):
    """Markdown tables in the layout of Table 2 (T2I) and of the MFG ablation (T2V), in percent."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    lines = ["| arm | seed | CFG | Color | Shape | Spatial | Overall | Single obj. | Obj. recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(results.get("t2i", []), key=lambda r: r.get("group") == "scale")  # conditioning first
    for i, r in enumerate(rows):
        if i and r.get("group") != rows[i - 1].get("group"):
            lines.append("| *model scale (own budget)* | | | | | | | | |")
        lines.append(f"| {r['arm']} | {r['seed']} | {r['cfg']} | {pct(r.get('color'))} | {pct(r.get('shape'))} | "
                     f"{pct(r.get('spatial'))} | {pct(r.get('overall'))} | {pct(r.get('single'))} | "
                     f"{pct(r.get('object_recall'))} |")
    lines += ["", "| T2V arm | lambda_M | Frame attr. | Direction | Consistency |", "|---|---|---|---|---|"]
    for r in results.get("t2v", []):
        lines.append(f"| {r['arm']} | {r['mfg']} | {pct(r['frame_attribute'])} | {pct(r['direction'])} | "
                     f"{pct(r['consistency'])} |")
    return "\n".join(lines) + "\n"


def check_args(args):
    """Settings that would fail (or score nothing) only after hours of training: refused before the first arm."""
    counts = ("steps", "batch_size", "scale_batch_size", "t2v_steps", "t2v_batch_size", "n_eval")
    for name in counts + ("scale_steps", "num_samples", "workers"):
        lo = 1 if name in counts else 0
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if min(args.seeds) < 0:
        p.error(f"--seeds must be >= 0, got {min(args.seeds)}")
    for name in ("lr", "scale_lr", "t2v_lr"):
        if not getattr(args, name) > 0:  # (also nan)
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    from pipeline import check_settings

    try:  # as sample.py: finite guidance scales, a device this machine has
        for cfg in args.cfg:
            check_settings(dict(seed=0, cfg=cfg, mfg=1.0, device=args.device), out_dir=args.out)
        for mfg in args.mfg:
            check_settings(dict(seed=0, cfg=args.t2v_cfg, mfg=mfg, device=args.device), args.out, {"cfg": "--t2v-cfg"})
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    args = p.parse_args()
    check_args(args)
    main(args)
