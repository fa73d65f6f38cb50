"""
The paper's comparative findings, reproduced at toy scale on the built-in synthetic data and scored
exactly with evaluate.py's oracle (held-out colour-shape pairs never seen in training):

  1. conditioning: cross-attention vs adaLN-zero          (Table 2 rows 1-2, Fig. 4)
  2. model scale: toy vs S, same data and steps            (Fig. 5, Table 2 last row)
  3. pooled text added to the time embedding, or not       (Sec. 3.2.1, last paragraph)
  4. motion-free guidance: T2V trained with p_motion_free = 0.5 and joint image-video batches,
     sampled with lambda_M in {1.0, 1.1, 1.2, 1.3}, vs one trained without the motion-free mask
                                                           (Sec. 3.3.2, Eq. 6, Fig. 8)

Every arm gets the same budget (steps, batch, seed, data order). Arms of a phase train concurrently
as separate `train_t2i.py` / `train_t2v.py` processes, which a small model leaves plenty of GPU for.

    python experiments.py --out runs/exp                    # all arms on one GPU, writes results.md/.json
    python experiments.py --out runs/exp --seeds 0 1        # two seeds per T2I arm
    python experiments.py --smoke --device cpu              # minutes-long end-to-end check of the pipeline
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import torch

from evaluate import oracle_eval
from sample import export, load_model

T2I_ARMS = {  # name -> extra train_t2i.py flags (the first arm is the baseline and the T2V parent)
    "cross-attn": [],
    "adaLN-zero": ["--conditioning", "adaln"],
    "cross-attn, no pooled": ["--no-pooled-text"],
    "cross-attn, size S": ["--size", "S"],
}
T2V_ARMS = {"MFG (p_mf=0.5)": ["--p-motion-free", "0.5"], "no motion-free (p_mf=0)": ["--p-motion-free", "0"]}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="runs/exp")
p.add_argument("--steps", type=int, default=4000, help="T2I steps per arm")
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--t2v-steps", type=int, default=1500)
p.add_argument("--t2v-batch-size", type=int, default=32)
p.add_argument("--lr", type=float, default=3e-4, help="toy runs of a few thousand steps; the paper's 1e-4 is for 500K")
p.add_argument("--ema", type=float, default=0.999, help="EMA decay (a toy run is shorter than DiT's 1/(1-0.9999))")
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--n-eval", type=int, default=100, help="held-out prompts per category (T2I) / clips (T2V)")
p.add_argument("--cfg", type=float, nargs="+", default=[4.0, 7.5], help="lambda_T values for T2I scoring")
p.add_argument("--t2v-cfg", type=float, default=7.5, help="lambda_T for T2V, fixed as in Sec. 3.3.2")
p.add_argument("--mfg", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3])
p.add_argument("--workers", type=int, default=3, help="DataLoader workers per training process")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--export-assets", action="store_true", help="write the baseline T2I / MFG T2V EMA weights to assets/")
p.add_argument("--t2i-arms", nargs="+", default=list(T2I_ARMS), help="subset of the T2I arms (the first is the T2V parent)")
p.add_argument("--smoke", action="store_true", help="tiny budget, to check the pipeline end to end")


def launch(script, out, flags, args, log):
    """Start one training run as its own process (its own CUDA context); returns the Popen."""
    device = "cuda:0" if args.device == "cuda" else args.device  # each process sees one GPU
    cmd = [sys.executable, script, "--out", out, "--device", device, "--ema", str(args.ema), "--lr", str(args.lr),
           "--num-workers", str(args.workers), "--log-every", "250", "--eval-n", "0", *flags]  # scored below
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


def run_all(jobs):
    """Wait for every job; a failed run stops the experiment with its log's tail."""
    for name, (proc, log) in jobs.items():
        if proc.wait() != 0:
            tail = open(log).read()[-3000:]
            raise SystemExit(f"arm {name!r} failed (log {log}):\n{tail}")


def main(args):
    if args.smoke:
        args.steps, args.t2v_steps, args.batch_size, args.t2v_batch_size, args.n_eval = 20, 10, 8, 4, 4
        args.cfg, args.mfg = args.cfg[:1], args.mfg[:2]
    os.makedirs(args.out, exist_ok=True)
    common = ["--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--ckpt-every", str(args.steps)]
    t0 = time.time()

    # Phase 1: the T2I arms, all seeds, concurrently
    jobs, runs = {}, {}
    for seed in args.seeds:
        for name, flags in ((n, T2I_ARMS[n]) for n in args.t2i_arms):
            out = os.path.join(args.out, f"t2i-{slug(name)}-s{seed}")
            runs[(name, seed)] = out
            if not os.path.isdir(out) or not any(f.startswith("ckpt-") for f in os.listdir(out)):
                jobs[(name, seed)] = (launch("train_t2i.py", out, [*common, "--seed", str(seed), *flags], args,
                                             out + ".log"), out + ".log")
    run_all(jobs)
    print(f"T2I arms done in {time.time() - t0:.0f}s", flush=True)

    # Phase 1 scores: every arm on the same held-out prompts and noise seeds
    results = {"t2i": [], "t2v": [], "settings": vars(args)}
    for (name, seed), out in runs.items():
        model, meta = load_model(out, ema=True, device=args.device)
        for cfg in args.cfg:
            s = oracle_eval(model, meta, n_per_category=args.n_eval, seed=1000, cfg=cfg, device=args.device,
                            progress=False)
            results["t2i"].append({"arm": name, "seed": seed, "cfg": cfg, **s})
    parent = runs[(args.t2i_arms[0], args.seeds[0])]
    write(results, args, t0)
    if args.export_assets:  # the quick start's bundled models (README): EMA weights in fp16, < 20 MB together
        export(parent, "assets/gentron_t2i.safetensors", dtype="fp16")

    # Phase 2: the T2V arms, from the baseline T2I run of the first seed (Sec. 3.3.1)
    parent_ckpt = sorted(glob.glob(os.path.join(parent, "ckpt-*.pt")))[-1]
    t2v_common = ["--init-from", parent_ckpt, "--max-steps", str(args.t2v_steps), "--batch-size", str(args.t2v_batch_size),
                  "--ckpt-every", str(args.t2v_steps), "--seed", str(args.seeds[0])]
    jobs, vruns = {}, {}
    for name, flags in T2V_ARMS.items():
        out = os.path.join(args.out, f"t2v-{slug(name)}")
        vruns[name] = out
        if not os.path.isdir(out) or not any(f.startswith("ckpt-") for f in os.listdir(out)):
            jobs[name] = (launch("train_t2v.py", out, [*t2v_common, *flags], args, out + ".log"), out + ".log")
    run_all(jobs)
    print(f"T2V arms done in {time.time() - t0:.0f}s", flush=True)
    for name, out in vruns.items():
        model, meta = load_model(out, ema=True, device=args.device)
        for mfg in args.mfg:
            s = oracle_eval(model, meta, n_per_category=args.n_eval, seed=1000, cfg=args.t2v_cfg, mfg=mfg,
                            device=args.device, progress=False)
            results["t2v"].append({"arm": name, "mfg": mfg, **s})
    write(results, args, t0)
    if args.export_assets:
        export(vruns[next(iter(T2V_ARMS))], "assets/gentron_t2v.safetensors", dtype="fp16")


def write(results, args, t0):
    """results.json and results.md (the README tables) in --out; printed too."""
    results["seconds"] = time.time() - t0
    results["device"] = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    table = tables(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table, flush=True)


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def tables(results):
    """Markdown tables in the layout of Table 2 (T2I) and of the MFG ablation (T2V), in percent."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    lines = ["| arm | seed | CFG | Color | Shape | Spatial | Overall | Single obj. |", "|---|---|---|---|---|---|---|---|"]
    for r in results["t2i"]:
        lines.append(f"| {r['arm']} | {r['seed']} | {r['cfg']} | {pct(r.get('color'))} | {pct(r.get('shape'))} | "
                     f"{pct(r.get('spatial'))} | {pct(r.get('overall'))} | {pct(r.get('single'))} |")
    lines += ["", "| T2V arm | lambda_M | Frame attr. | Direction | Consistency |", "|---|---|---|---|---|"]
    for r in results["t2v"]:
        lines.append(f"| {r['arm']} | {r['mfg']} | {pct(r['frame_attribute'])} | {pct(r['direction'])} | "
                     f"{pct(r['consistency'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(p.parse_args())
