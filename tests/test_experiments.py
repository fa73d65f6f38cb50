"""experiments.py: Wilson intervals, the --budget presets, and a long comparison run in pieces (--time-limit):
an arm stopped by the limit is reported unfinished and not scored, and the same command again resumes it."""

import json
import os

import pytest

import experiments
from checkpoint import checkpoints


def test_wilson_known_values():
    lo, hi = experiments.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert experiments.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert experiments.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert experiments.wilson(42, 100) == pytest.approx((0.3280, 0.5179), abs=1e-4)
    assert experiments.wilson(0, 0) == (0.0, 1.0)  # nothing scored: nothing known


def test_intervals_count_prompts_objects_and_clips():
    """T2I: n prompts per category; overall and colors_placed pool the three two-object categories, object recall
    counts objects (one per single prompt, two otherwise). T2V: n clips for every score."""
    s = experiments.intervals({"single": 0.5, "color": 0.25, "shape": 0.0, "spatial": 1.0, "overall": 5 / 12,
                               "object_recall": 0.5, "colors_placed": 0.75,
                               "n": {"single": 4, "color": 4, "shape": 4, "spatial": 4}})
    assert s["color_ci"] == pytest.approx(experiments.wilson(1, 4), abs=1e-4)
    assert s["single_ci"] == pytest.approx(experiments.wilson(2, 4), abs=1e-4)
    assert s["overall_ci"] == pytest.approx(experiments.wilson(5, 12), abs=1e-4)
    assert s["colors_placed_ci"] == pytest.approx(experiments.wilson(9, 12), abs=1e-4)
    assert s["object_recall_ci"] == pytest.approx(experiments.wilson(14, 28), abs=1e-4)
    v = experiments.intervals({"frame_attribute": 0.9, "direction": 0.5, "consistency": 1.0, "n": 500})
    assert v["direction_ci"] == pytest.approx(experiments.wilson(250, 500), abs=1e-4)
    assert v["consistency_ci"][1] == 1.0
    assert experiments.intervals({"color": 0.5}) == {"color": 0.5}  # no counts: no interval


def test_budget_presets_fill_defaults_and_flags_override(tmp_path):
    toy = experiments.p.parse_args([])
    assert (toy.steps, toy.batch_size, toy.lr, toy.ema, toy.lr_schedule, toy.n_eval) == (3000, 1024, 1e-3, 0.999,
                                                                                          "cosine", 100)
    assert (toy.scale_steps, toy.scale_batch_size, toy.scale_lr) == (1500, 512, 5e-4)
    assert (toy.t2v_steps, toy.t2v_batch_size, toy.t2v_lr, toy.t2v_ema, toy.t2v_n_eval) == (2500, 64, 5e-4, 0.999, 100)
    assert toy.qk_norm is False and toy.t2v_seeds == [0] and toy.time_limit is None
    paper = experiments.p.parse_args(["--budget", "paper"])
    assert paper.batch_size == 2048 and paper.steps * paper.batch_size >= 30e6
    assert paper.scale_steps * paper.scale_batch_size == paper.steps * paper.batch_size  # the same images
    assert (paper.lr, paper.ema, paper.qk_norm, paper.n_eval, paper.t2v_n_eval) == (1e-3, 0.9995, True, 300, 500)
    assert (paper.t2v_steps, paper.t2v_batch_size, paper.t2v_ema, paper.t2v_seeds) == (2000, 128, 0.998, [0, 1])
    mine = experiments.p.parse_args(["--budget", "paper", "--steps", "100", "--no-qk-norm", "--n-eval", "7",
                                     "--ema", "0.99", "--t2v-seeds", "3"])
    assert (mine.steps, mine.qk_norm, mine.n_eval, mine.ema) == (100, False, 7, 0.99)
    assert (mine.batch_size, mine.t2v_n_eval, mine.t2v_ema, mine.t2v_seeds) == (2048, 500, 0.998, [3])
    toy = experiments.p.parse_args(["--ema", "0.99", "--n-eval", "7", "--seeds", "2", "5"])
    assert (toy.t2v_ema, toy.t2v_n_eval, toy.t2v_seeds) == (0.99, 7, [2])  # toy: the T2I flags' values
    with pytest.raises(SystemExit) as e:
        experiments.p.parse_args(["--budget", "huge"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["--time-limit", "0"], "--time-limit must be > 0 minutes"),
    (["--t2v-n-eval", "0"], "--t2v-n-eval must be >= 1, got 0"),
    (["--ema", "1"], "--ema must be in [0, 1), got 1.0"),
    (["--budget", "paper", "--t2i-arms", "cross-attn", "cross-attn, QK-norm"], "leave out --qk-norm"),
])
def test_bad_flags_are_one_line_usage_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        experiments.check_args(experiments.p.parse_args(["--out", str(tmp_path), *argv]))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_launch_passes_the_time_limit_and_resume(tmp_path, monkeypatch):
    seen = []

    class Popen:
        def __init__(self, cmd, **kw):
            seen.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(experiments.subprocess, "Popen", Popen)
    args = experiments.p.parse_args(["--device", "cpu"])
    experiments.launch("train_t2i.py", str(tmp_path / "a"), ["--lr", "0.001"], args, str(tmp_path / "a.log"),
                       minutes=21.5, resume=True)
    experiments.launch("train_t2i.py", str(tmp_path / "a"), ["--lr", "0.001"], args, str(tmp_path / "a.log"))
    assert seen[0][seen[0].index("--time-limit") + 1] == "21.5" and "--resume" in seen[0]
    assert "--time-limit" not in seen[1] and "--resume" not in seen[1] and seen[1][-2:] == ["--lr", "0.001"]


def test_finished_fewer_steps_resume_more_steps_refused(tmp_path):
    out = tmp_path / "t2i-cross-attn-s0"
    (out / "ckpt-0000010").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds a run of 10 steps but this call trains 20 and has no record"):
        experiments.finished(str(out), 20)  # no record of its flags: not this script's arm
    (out / "experiment.json").write_text(json.dumps({"script": "train_t2i.py", "steps": 20, "flags": ["--lr", "1"]}))
    assert not experiments.finished(str(out), 20)  # stopped by --time-limit: continued
    assert experiments.plan(str(out), "train_t2i.py", ["--lr", "1"], 20) == "resume"
    with pytest.raises(SystemExit, match="was started with --lr 1, this call gives it --lr 2"):
        experiments.plan(str(out), "train_t2i.py", ["--lr", "2"], 20)
    with pytest.raises(SystemExit, match="holds a run of 10 steps but this call trains 5: use another"):
        experiments.finished(str(out), 5)
    assert experiments.finished(str(out), 10)
    with pytest.raises(SystemExit, match="T2I parent .* is at step 10 of 20"):
        experiments.check_parent(str(out))  # a T2V phase never starts from an unfinished arm
    with pytest.raises(SystemExit, match="at step 10 of 20"):
        experiments.check_parent(str(out / "ckpt-0000010"))


def fake_world(monkeypatch, stop_at):
    """launch, scoring and export without training: a launch writes the arm's checkpoint folder at its
    --max-steps, or at stop_at[folder name] when it runs under a time limit (the limit stops it there)."""
    calls = {"launch": [], "score": []}

    def launch(script, out, flags, args, log, minutes=None, resume=False):
        assert resume == bool(checkpoints(out))  # train_t2i.py refuses a folder with checkpoints without --resume
        calls["launch"].append((os.path.basename(out), minutes, resume, flags))
        steps = int(flags[flags.index("--max-steps") + 1])
        step = stop_at.pop(os.path.basename(out), steps) if minutes else steps
        os.makedirs(os.path.join(out, f"ckpt-{step:07d}"))
        return type("Done", (), {"wait": lambda self: 0})()

    def oracle_eval(model, meta, n_per_category, seed, cfg, mfg=None, device=None, progress=True):
        calls["score"].append((os.path.basename(model), cfg, mfg))
        settings = dict(ckpt=os.path.abspath(checkpoints(model)[-1]), n_per_category=n_per_category, cfg=cfg, mfg=mfg)
        if "t2v-" in model:
            return {"frame_attribute": 0.5, "direction": 0.5, "consistency": 0.5, "n": n_per_category,
                    "settings": settings}
        n = {c: n_per_category for c in ("single", "color", "shape", "spatial")}
        return {"single": 1.0, "color": 0.5, "shape": 0.5, "spatial": 0.5, "overall": 0.5, "object_recall": 0.5,
                "n": n, "settings": {**settings, "mfg": None}}

    monkeypatch.setattr(experiments, "launch", launch)
    monkeypatch.setattr(experiments, "load_model", lambda out, **kw: (out, {}))
    monkeypatch.setattr(experiments, "oracle_eval", oracle_eval)
    monkeypatch.setattr(experiments, "export", lambda src, dst, **kw: open(dst, "w").close())
    return calls


def test_an_arm_stopped_by_the_time_limit_is_reported_then_resumed_and_scored(tmp_path, monkeypatch, capsys):
    calls = fake_world(monkeypatch, {"t2i-cross-attn-s0": 1200})
    argv = ["--out", str(tmp_path), "--budget", "paper", "--time-limit", "22", "--device", "cpu",
            "--t2i-arms", "cross-attn", "adaLN-zero", "--scale-steps", "0", "--cfg", "4", "--mfg", "1", "1.2"]
    args = experiments.p.parse_args(argv)
    with pytest.raises(SystemExit) as e:  # call 1: the baseline arm stops at step 1200 of 15000
        experiments.main(args, argv)
    assert e.value.code == experiments.EXIT_UNFINISHED
    printed = capsys.readouterr().out
    assert "t2i 'cross-attn' seed 0: step 1200 of 15000" in printed
    assert "continue them with the same command:\n  python experiments.py --out" in printed
    assert "T2V phase: starts once every T2I arm has finished" in printed
    launched = {name: flags for name, _, _, flags in calls["launch"]}
    assert set(launched) == {"t2i-cross-attn-s0", "t2i-adaln-zero-s0"}  # no T2V arm from an unfinished parent
    for flags in launched.values():  # the paper budget: the bundled recipe, QK-norm in every arm
        assert flags[flags.index("--max-steps") + 1] == "15000" and flags[flags.index("--batch-size") + 1] == "2048"
        assert "--qk-norm" in flags and flags[flags.index("--ema") + 1] == "0.9995"
        assert flags[flags.index("--ckpt-every") + 1] == str(experiments.CKPT_EVERY)
    assert all(0 < minutes <= 22 for _, minutes, _, _ in calls["launch"])
    r = json.load(open(tmp_path / "results.json"))
    assert [(u["arm"], u["step"], u["steps"]) for u in r["unfinished"]] == [("cross-attn", 1200, 15000)]
    assert [row["arm"] for row in r["t2i"]] == ["adaLN-zero"]  # the unfinished arm is not scored
    assert r["t2i"][0]["color_ci"] == pytest.approx(experiments.wilson(150, 300), abs=1e-4)
    md = open(tmp_path / "results.md").read()
    assert "| adaLN-zero | 0 | 4.0 | 50.0 (44.4-55.6) |" in md and "| t2i | cross-attn | 0 | 1200 | 15000 |" in md
    assert not os.path.exists(tmp_path / "t2i-parent.safetensors")

    calls["launch"].clear(), calls["score"].clear()
    experiments.main(experiments.p.parse_args(argv), argv)  # call 2: resumed, scored; then the T2V arms
    first = calls["launch"][0]
    assert first[:1] == ("t2i-cross-attn-s0",) and first[2] and first[3] == launched["t2i-cross-attn-s0"]
    assert [name for name, *_ in calls["launch"][1:]] == ["t2v-mfg-p-mf-0-5", "t2v-no-motion-free-p-mf-0",
                                                          "t2v-mfg-p-mf-0-5-s1", "t2v-no-motion-free-p-mf-0-s1"]
    t2v = calls["launch"][1][3]
    assert t2v[t2v.index("--init-from") + 1] == str(tmp_path / "t2i-parent.safetensors")
    assert (t2v[t2v.index("--max-steps") + 1], t2v[t2v.index("--ema") + 1]) == ("2000", "0.998")
    # the arm finished in call 1 is not scored again; the T2V arms at 500 clips, the p_mf = 0 arm at lambda_M 1
    assert [s for s in calls["score"] if s[0].startswith("t2i")] == [("t2i-cross-attn-s0", 4.0, None)]
    r = json.load(open(tmp_path / "results.json"))
    assert r["unfinished"] == [] and sorted(row["arm"] for row in r["t2i"]) == ["adaLN-zero", "cross-attn"]
    assert [(row["arm"], row["seed"], row["mfg"]) for row in r["t2v"]] == [
        ("MFG (p_mf=0.5)", 0, 1.0), ("MFG (p_mf=0.5)", 0, 1.2), ("no motion-free (p_mf=0)", 0, 1.0),
        ("MFG (p_mf=0.5)", 1, 1.0), ("MFG (p_mf=0.5)", 1, 1.2), ("no motion-free (p_mf=0)", 1, 1.0)]
    assert all(row["settings"]["n_per_category"] == 500 and len(row["direction_ci"]) == 2 for row in r["t2v"])
    assert "every arm finished" in capsys.readouterr().out and "Unfinished" not in open(tmp_path / "results.md").read()
    assert len(r["calls"]) == 2


def test_no_time_left_for_the_t2v_arms_waits_for_the_next_call(tmp_path, monkeypatch):
    """With --phase all, T2I arms that finish close to the limit leave the T2V arms to the next call: reported
    unfinished at step 0, not started with a piece too short to set up."""
    calls = fake_world(monkeypatch, {})
    argv = ["--out", str(tmp_path), "--time-limit", "0.5", "--device", "cpu", "--t2i-arms", "cross-attn",
            "--scale-steps", "0"]
    left = iter([0.4, 0.1, 0.1])  # minutes left at each launch: the T2I arm starts, then too little for a T2V arm
    monkeypatch.setattr(experiments, "minutes_left", lambda args, t0: next(left))
    with pytest.raises(SystemExit) as e:
        experiments.main(experiments.p.parse_args(argv), argv)
    assert e.value.code == experiments.EXIT_UNFINISHED
    assert [name for name, *_ in calls["launch"]] == ["t2i-cross-attn-s0"]
    r = json.load(open(tmp_path / "results.json"))
    assert [(u["phase"], u["arm"], u["step"]) for u in r["unfinished"]] == [("t2v", "MFG (p_mf=0.5)", 0),
                                                                         ("t2v", "no motion-free (p_mf=0)", 0)]
    assert len(r["t2i"]) == 2 and r["t2v"] == []  # the finished T2I arm is scored (CFG 4 and 7.5)
    calls["launch"].clear()
    monkeypatch.setattr(experiments, "minutes_left", lambda args, t0: 0.45)
    experiments.main(experiments.p.parse_args(argv), argv)
    assert [name for name, *_ in calls["launch"]] == ["t2v-mfg-p-mf-0-5", "t2v-no-motion-free-p-mf-0"]
    assert json.load(open(tmp_path / "results.json"))["unfinished"] == []


@pytest.mark.skipif(not os.path.exists("train_t2i.py"), reason="run from the repository root")
def test_a_real_arm_stopped_by_the_time_limit_leaves_a_checkpoint_to_resume(tmp_path):
    """train_t2i.py under --time-limit exits with status 0 and a checkpoint below --max-steps, which experiments.py
    continues with --resume (the tiny model, batch 2: seconds)."""
    args = experiments.p.parse_args(["--device", "cpu", "--workers", "0", "--num-samples", "0"])
    out, flags = str(tmp_path / "arm"), ["--size", "tiny", "--max-steps", "1000", "--batch-size", "2",
                                         "--ckpt-every", "1000", "--lr", "0.001"]
    proc = experiments.launch("train_t2i.py", out, flags, args, out + ".log", minutes=0.001)
    assert proc.wait() == 0, open(out + ".log").read()[-2000:]
    assert [os.path.basename(c) for c in checkpoints(out)] == ["ckpt-0000010"]  # the first stop check past it
    assert "--time-limit 0.001 min reached: stopped at step 10 of 1000" in open(out + ".log").read()
    experiments.write_json(experiments.record_path(out), {"script": "train_t2i.py", "steps": 1000, "flags": flags})
    assert experiments.plan(out, "train_t2i.py", flags, 1000) == "resume"
