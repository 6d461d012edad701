"""Prints the case table of ``docs/peers.md``: ``python tests/peers/table.py [TALLY.json]``.

The tally is what the tests check, per measured case and estimator: on how many of seeds 0-3 the
trace interval covers the exact trace, and whether the top-3 eigenvalues converged and equal the
dense ones counted with multiplicity. Without a file it is computed (minutes) and written to
``peer-tally.json``; the totals are printed last."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parents[2])]

from peers import peer_cases as pc  # noqa: E402
from peers.reference import dense  # noqa: E402

import deconcnn_curvature as dcc  # noqa: E402

REASONS = {
    pc.BP_DICT: "refused: the forward indexes a dict input (`getitem` outside a layer)",
    pc.BP_BN: "refused: BatchNorm1d (no exact BackPACK rule)",
    pc.BP_MSE_ND: "refused: BackPACK's MSELoss rule needs 2-D outputs",
    pc.BP_BCE: "refused: BackPACK's BCEWithLogitsLoss rule needs outputs (batch, 1)",
    pc.BP_MOVE: "refused: `.movedim()` outside a layer",
    pc.BP_MEAN: "refused: `.mean()` outside a layer",
    pc.BP_PERMUTE: "refused: `.permute()` outside a layer",
    pc.BP_RAW: "refused: raw parameter `w1` used outside a layer",
    pc.BP_AVG64: "refused in float64 (BackPACK's average-pooling rule fails there); "
    "float32: equal to dense (rtol 1e-4)",
}


def describe(module: nn.Module) -> str:
    if isinstance(module, nn.Sequential):
        return " → ".join(describe(m) for m in module)
    children = list(module.named_children())
    if children:
        inner = ", ".join(describe(m) for _, m in children)
        return f"{type(module).__name__}[{inner}]"
    args = module.extra_repr().replace(" ", "")
    for noise in ("in_features=", "out_features=", ",bias=True", "kernel_size=", "output_size="):
        args = args.replace(noise, "")
    args = args.replace("start_dim=1,end_dim=-1", "")
    frozen = any(True for _ in module.parameters()) and not any(
        p.requires_grad for p in module.parameters()
    )
    return f"{type(module).__name__}({args})" + (" frozen" if frozen else "")


def loss_text(case: pc.PeerCase) -> str:
    loss = case.loss()
    return f"{type(loss).__name__}({loss.reduction})"


def row(case: pc.PeerCase, tally: dict) -> str:
    model, _, batches = case.make()
    shapes = ", ".join(
        "x".join(map(str, (x["x"] if not hasattr(x, "shape") else x).shape)) for x, _ in batches
    )
    if case.reduction == "sum":
        static = case.backpack is not None and case.backpack not in (pc.BP_BCE, pc.BP_MSE_ND)
        bp = REASONS[case.backpack] if static else "refused: reduction='sum'"
        est = "both refused: reduction='sum'"
    else:
        bp = (
            "exact: trace and diagonal = dense" if case.backpack is None else REASONS[case.backpack]
        )
        t = tally[case.id]
        est = "; ".join(
            f"{b}: trace {t[b]['covered']}/4"
            + (" (xfail)" if t[b]["covered"] < 2 else "")
            + ", top-3 "
            + (
                "converged ✓"
                if t[b]["converged"] and t[b]["eig_ok_mult"]
                else "converged, ≠ dense counted with multiplicity (xfail)"
                if t[b]["converged"]
                else "not converged"
            )
            for b in ("pyhessian", "hutchpp")
        )
    return f"| `{case.id}` | {describe(model)} | {loss_text(case)} | {shapes} | {bp} | {est} |"


def _tally_case(case: pc.PeerCase) -> dict:
    h = dense(case)
    exact, spectrum = float(h.trace()), torch.linalg.eigvalsh(h).flip(0)
    slack = 1e-9 * max(float(h.diagonal().abs().sum()), 1e-12)
    k = min(3, spectrum.numel())
    tol = 1e-3 * float(spectrum.abs().max()) + 1e-12
    row: dict = {"dim": h.shape[0], "trace": exact}
    for backend in ("pyhessian", "hutchpp"):
        covered = 0
        for seed in range(4):
            model, loss_fn, batches = case.make()
            lo, hi = dcc.estimate(model, loss_fn, batches, backend=backend, seed=seed).ci
            covered += lo - slack <= exact <= hi + slack
        model, loss_fn, batches = case.make()
        r = dcc.estimate(model, loss_fn, batches, "eigenvalues", backend=backend, seed=0, k=k)
        ok = all(abs(g - w) <= tol for g, w in zip(r.value, spectrum[:k].tolist(), strict=True))
        row[backend] = {
            "covered": covered,
            "converged": bool(r.details["converged"]),
            "eig_ok_mult": ok,
        }
    return row


def tally_all() -> dict:
    tally = {c.id: _tally_case(c) for c in pc.MEASURED}
    Path("peer-tally.json").write_text(json.dumps(tally, indent=1))
    return tally


def main() -> None:
    tally = json.loads(Path(sys.argv[1]).read_text()) if len(sys.argv) > 1 else tally_all()
    order = [*pc.ALL_CASES, *[c for c in pc.MEASURED if c not in pc.ALL_CASES]]
    for source in dict.fromkeys(c.source for c in pc.ALL_CASES):
        print(f"\n### {source}\n")
        print("| case | model | loss | batches | backpack | pyhessian / hutchpp |")
        print("|---|---|---|---|---|---|")
        for case in order:
            if case.source == source:
                print(row(case, tally))
    for backend in ("pyhessian", "hutchpp"):
        rows = [t[backend] for t in tally.values()]
        print(
            f"\n{backend}: trace intervals covered {sum(r['covered'] for r in rows)} of "
            f"{4 * len(rows)}; eigenvalue results {len(rows)}, converged "
            f"{sum(r['converged'] for r in rows)}, converged and equal to the dense values "
            f"counted with multiplicity {sum(r['converged'] and r['eig_ok_mult'] for r in rows)}"
        )


if __name__ == "__main__":
    main()
