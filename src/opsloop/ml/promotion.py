"""The promotion gate: absolute floors from the spec, then 'beats the champion on the same
holdout by at least minMargin'. Pure functions; every decision carries its reason."""

from __future__ import annotations

from dataclasses import dataclass

from opsloop.spec.ml import PromotionSpec

CHAMPION = "champion"
PREVIOUS = "previous"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class Decision:
    promote: bool
    alias: str | None  # champion | challenger | None
    reason: str

    @property
    def label(self) -> str:
        if self.alias == CHAMPION:
            return "promoted"
        if self.alias == CHALLENGER:
            return "challenger"
        return "rejected"


def decide(
    challenger: dict[str, float],
    ps: PromotionSpec,
    champion: dict[str, float] | None = None,
    champion_version: str | None = None,
    fairness_gap: float | None = None,
    incomparable: str | None = None,
) -> Decision:
    """``champion``: the current champion's metrics on the challenger's holdout (None: no champion)."""
    floors: list[str] = []
    auc, brier = challenger["roc_auc"], challenger["brier"]
    if auc < ps.min_roc_auc:
        floors.append(f"roc_auc {auc:.4f} < minRocAuc {ps.min_roc_auc}")
    if brier > ps.max_brier:
        floors.append(f"brier {brier:.4f} > maxBrier {ps.max_brier}")
    if ps.max_fairness_gap is not None and fairness_gap is not None and fairness_gap > ps.max_fairness_gap:
        floors.append(f"fairness gap {fairness_gap:.4f} > maxFairnessGap {ps.max_fairness_gap}")
    if floors:
        return Decision(False, None, "failed thresholds: " + "; ".join(floors))
    passed = f"passes thresholds (roc_auc {auc:.4f} ≥ {ps.min_roc_auc}, brier {brier:.4f} ≤ {ps.max_brier})"
    if champion is None:
        if incomparable:
            return Decision(False, None, f"not promoted: {incomparable}")
        return Decision(True, CHAMPION, f"first model: no champion yet; {passed}")
    m = ps.metric
    diff = challenger[m] - champion[m]
    vs = f"{m} {challenger[m]:.4f} vs champion v{champion_version} {champion[m]:.4f} on the same holdout"
    if diff < ps.min_margin:
        return Decision(False, None, f"not better by minMargin {ps.min_margin}: {vs} (Δ {diff:+.4f})")
    if ps.rollout != "direct":
        return Decision(
            False, CHALLENGER, f"beats the champion ({vs}, Δ {diff:+.4f}); {ps.rollout} rollout before promotion"
        )
    return Decision(True, CHAMPION, f"beats the champion by ≥ minMargin {ps.min_margin}: {vs} (Δ {diff:+.4f})")
