"""What load-based expert assignment picks, against chance: the measured modality load of the aligned model
(``profile/profile/load.json`` of each seed of a ``benchmarks/recipe_table.py`` run) under the choices the
paper leaves open, the score, the share of speech experts and the amount of profiling data.

    python -m benchmarks.assignment --out runs/recipe_table26 --seeds 0 1 2          # ~1 min a seed (profiling)
    python -m benchmarks.assignment --out runs/recipe_table26 --seeds 0 --no-stability   # the load files only

For every seed, MoE layer, score and share n (of E experts) it picks the top n experts by the score and
reports the share of the speech load and of the text load they carry (chance: n / E for both), and their
difference, the *separation*: an assignment protects text only insofar as the speech experts carry little of
it. Scores: ``paper`` rho_A * (1 - rho_T) (deepomni.model.modality.assign_from_load), ``difference``
rho_A - rho_T, ``ratio`` rho_A / rho_T, ``speech`` rho_A alone. ``--stability`` profiles the aligned model
again on the first 25% and 50% of the training rows and reports how many of the chosen experts (paper score,
n = the run's) the full profile keeps. Prints and saves benchmarks/results/assignment.{json,md}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS, command, parser
from deepomni.model import modality
from deepomni.data.tokenized import iter_rows
from deepomni.train.profile import SPEECH, TEXT, LoadTable, assign_from_load, profile_load

# the scores assignment offers (paper, difference) and two more to compare: the ratio, and speech load alone
SCORES = {**modality.SCORES, "ratio": lambda a, t: a / t.clamp(min=1e-9), "speech": lambda a, t: a}


def picks(rho_A_LE: torch.Tensor, rho_T_LE: torch.Tensor, score: str, n: int) -> torch.Tensor:
    """``[L, n]`` expert ids: the top ``n`` per layer by ``score``."""
    return torch.topk(SCORES[score](rho_A_LE, rho_T_LE), n, dim=1).indices


def shares(rho_LE: torch.Tensor, ids_LN: torch.Tensor) -> list[float]:
    """The share of the load the chosen experts carry, per layer."""
    return rho_LE.gather(1, ids_LN).sum(dim=1).tolist()


def _row(score: str, ids_LN: torch.Tensor, A: torch.Tensor, T: torch.Tensor) -> dict:
    n, E = ids_LN.shape[1], A.shape[1]
    s, t = shares(A, ids_LN), shares(T, ids_LN)
    return {"score": score, "n": n, "chance": n / E, "speech_share": sum(s) / len(s), "text_share": sum(t) / len(t),
            "separation": (sum(s) - sum(t)) / len(s)}


def seed_report(seed_dir: Path, ns: list[int]) -> dict:
    d = json.loads((seed_dir / "profile" / "profile" / "load.json").read_text())
    table = LoadTable.from_json(d["load"])
    A, T = table.rho(SPEECH), table.rho(TEXT)
    E = table.num_experts
    rows = [_row(score, picks(A, T, score, n), A, T) for score in SCORES for n in ns]
    random_dir = seed_dir / "profile" / "profile_random" / "experts.json"
    if random_dir.is_file():
        r = json.loads(random_dir.read_text())["layers"]
        rows.append(_row("random (the run's)", torch.tensor([r[str(l)]["speech"] for l in table.layer_ids]), A, T))
    corr = [float(torch.corrcoef(torch.stack([A[i], T[i]]))[0, 1]) for i in range(len(table.layer_ids))]
    return {"num_experts": E, "n_speech": d["n_speech"], "tokens": d["load"]["tokens"], "rows": rows,
            "load_correlation": corr, "max_rho": {"speech": float(A.max()), "text": float(T.max())}}


def stability(seed_dir: Path, n: int, fractions=(0.25, 0.5)) -> dict:
    """The paper's pick on the first ``fraction`` of the training rows, against the pick on all of them."""
    from deepomni.checkpoint import load_model

    model, _ = load_model(seed_dir / "runs" / "s1_align" / "final")
    full = LoadTable.from_json(json.loads((seed_dir / "profile" / "profile" / "load.json").read_text())["load"])
    ref = assign_from_load(full.rho(SPEECH), full.rho(TEXT), n, full.layer_ids)
    rows = sum(1 for _ in iter_rows(seed_dir / "data", "train"))
    out = {}
    for f in fractions:
        part = profile_load(model, iter_rows(seed_dir / "data", "train", max_items=int(f * rows)))
        a = assign_from_load(part.rho(SPEECH), part.rho(TEXT), n, part.layer_ids)
        kept = [len(set(a.speech[l]) & set(ref.speech[l])) / n for l in full.layer_ids]
        out[str(f)] = {"rows": int(f * rows), "kept": sum(kept) / len(kept), "per_layer": kept}
    return out


def markdown(report: dict) -> str:
    seeds = list(report["seeds"])
    lines = [f"Load-based assignment against chance (aligned model, seeds {seeds}; shares are means over the MoE "
             "layers, then over seeds)", "",
             "| score | n of E | chance | speech share | text share | separation (speech - text) |",
             "|---|---|---|---|---|---|"]
    keys = [(r["score"], r["n"]) for r in report["seeds"][seeds[0]]["rows"]]
    for score, n in keys:
        rs = [next(r for r in report["seeds"][s]["rows"] if (r["score"], r["n"]) == (score, n)) for s in seeds]
        avg = {k: sum(r[k] for r in rs) / len(rs) for k in ("speech_share", "text_share", "separation")}
        lines.append(f"| {score} | {n} of {report['seeds'][seeds[0]]['num_experts']} | {rs[0]['chance']:.3f} | "
                     f"{avg['speech_share']:.3f} | {avg['text_share']:.3f} | {avg['separation']:+.3f} |")
    lines += ["", "| seed | correlation of rho_A and rho_T per layer | max rho_A | max rho_T | profile on 25% / 50% "
              "of the rows: chosen experts kept |", "|---|---|---|---|---|"]
    for s in seeds:
        r = report["seeds"][s]
        st = r.get("stability")
        kept = " / ".join(f"{v['kept']:.2f}" for v in st.values()) if st else "-"
        corr = ", ".join(f"{c:+.2f}" for c in r["load_correlation"])
        lines.append(f"| {s} | {corr} | {r['max_rho']['speech']:.3f} | {r['max_rho']['text']:.3f} | {kept} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser("assignment", __doc__)
    ap.add_argument("--out", default="runs/recipe_table", help="a recipe_table.py working directory (seed<k>/)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shares", type=int, nargs="+", default=[2, 4, 8], help="speech experts per layer to compare")
    ap.add_argument("--no-stability", action="store_true", help="skip re-profiling on part of the rows")
    ap.add_argument("--results", default=str(RESULTS / "assignment"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    report = {"out": args.out, "seeds": {}}
    for seed in args.seeds:
        d = Path(args.out) / f"seed{seed}"
        report["seeds"][seed] = seed_report(d, args.shares)
        if not args.no_stability:
            report["seeds"][seed]["stability"] = stability(d, report["seeds"][seed]["n_speech"])
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    md = markdown(report)
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(report, indent=1))
    res.with_suffix(".md").write_text(f"# Assignment (`{command('assignment', argv)}`)\n\n"
                                      f"{md}\n\nwall time {report['wall_seconds']:.0f} s\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
