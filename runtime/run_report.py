"""What a run reports: the typed RunReport and the sections derived from the rules and the counts.

scl-annotate prints it (annotate_cli.print_summary) and writes it with --report; h5ad outputs and `to_adata` keep
it as uns['scl']['report_json']; `AnnotationResult.report` holds it as that JSON's dict.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from .calls import REASONS, CallRules
from .conformal import set_size_summary


@dataclass
class RunReport:
    """One run's summary. `to_dict()` is its JSON form, keys in this order; None sections are left out."""

    input: dict  # ExpressionSource.describe(): path, matrix, genes_from, input_kind, its evidence, cells, gene matching
    output: str | None
    majority_voting: dict | None  # voting.summary()
    novelty: dict  # the rule, the novel cells and whether they are unassigned
    unassigned: dict  # reason -> cells and the setting that changes it
    prediction_sets: dict | None  # with an alpha: set sizes and what they promise
    neighbours: dict | None  # with a reference: the reference, k, the labels the neighbours gave, agreement with the head
    restriction: dict | None  # {"restrict_to": [...]} or {"exclude": [...]}: the labels the run could call
    model: dict
    cells: int
    labels: dict  # label -> cells, most frequent first
    min_confidence: float
    min_cell_genes: int
    seconds: float
    cells_per_second: float | None

    OPTIONAL = ("majority_voting", "prediction_sets", "neighbours", "restriction")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not (k in self.OPTIONAL and v is None)}


HEAD_GENES_WARN_SHARE = 0.1  # missing marker genes above this share of the head's are named in a warning


def head_genes_report(head_genes: list[str], missing_model_genes: list[str], examples: int = 20) -> dict:
    """How many of the marker genes the head reads (model metadata head_genes) this input lacks: they read as 0, which
    moves the head's logits as a cell that does not express them would."""
    missing = sorted(set(head_genes).intersection(missing_model_genes))
    return {"head_genes": len(head_genes), "head_genes_missing": len(missing), "examples_head_genes_missing": missing[:examples]}


def head_genes_warning(report: dict, path: str) -> str | None:
    if not report["head_genes"] or report["head_genes_missing"] <= HEAD_GENES_WARN_SHARE * report["head_genes"]:
        return None
    return (f"warning: {path} lacks {report['head_genes_missing']:,} of the {report['head_genes']:,} marker genes the model's head reads "
            f"(e.g. {', '.join(report['examples_head_genes_missing'][:5])}): they count as not expressed, so labels that rely on them are less "
            "reliable; check the gene names (symbols or Ensembl ids) or annotate files that measure them.")


def percent(share: float, alpha: float) -> str:
    """A share as a percentage with the digits alpha needs: 99.9% at alpha 0.001, not a rounded 100%."""
    digits = max(0, math.ceil(-math.log10(min(alpha, 1 - alpha))) - 2)
    return f"{share:.{digits}%}"


def unassigned_report(rules: CallRules, reasons: Counter, genes_held: int) -> dict:
    """How many cells are unassigned for each reason, and the setting that changes it."""
    report = {reason: {"cells": reasons[reason], "setting": setting} for reason, setting in REASONS.items() if reasons[reason]}
    if "few_genes" in report:
        report["few_genes"]["rule"] = f"fewer than {rules.min_cell_genes:,} of the {genes_held:,} model genes this input holds are expressed"
    return report


def novelty_report(options, rules: CallRules, novel_cells: int) -> dict:
    if rules.novelty_limits is None and rules.calibration is None:
        return {"rule": None, "novel_cells": None, "unassigned_if_novel": False}
    if options.max_novelty not in (None, "auto"):
        rule = f"cosine distance to the label's centroid above {float(options.max_novelty):g}"
    elif rules.novelty_limits is not None:
        rule = "beyond the label's novelty limit from the model (exported before calibration)"
    else:
        rule = (f"novelty p <= {rules.novelty_alpha:g} among the label's calibration cells: "
                f"about {rules.novelty_alpha:.0%} of cells like them are flagged, by construction")
        n, reachable = rules.calibration.cells, rules.calibration.smallest_novelty_p()
        if not rules.calibration.group_is_enough(n, rules.novelty_alpha):
            rule += (f"; but this model has only {n} calibration cells, so no p-value can reach {rules.novelty_alpha:g} and no cell is "
                     f"flagged: use alpha {1 / (n + 1):.2g} or more, or calibrate on more cells")
        elif rules.novelty_alpha < reachable:
            rule += (f"; but the cells of some types are judged against too few calibration cells for p to reach {rules.novelty_alpha:g} "
                     f"(the smallest p there is {reachable:.2g}), so they are never flagged: use alpha {reachable:.2g} or more")
    return {"rule": rule, "alpha": rules.novelty_alpha if rules.novelty_limits is None else None,
            "novel_cells": novel_cells, "unassigned_if_novel": rules.unassign_novel}


def prediction_set_report(rules: CallRules, set_sizes: Counter, n_classes: int) -> dict | None:
    """Set sizes at the run's alpha and what they promise; None without an alpha."""
    if rules.set_alpha is None:
        return None
    sizes = np.repeat(np.fromiter(set_sizes, int), np.fromiter(set_sizes.values(), int))
    return {"alpha": rules.set_alpha, **set_size_summary(sizes, n_classes), "promise": set_promise(rules),
            "smallest_alpha": round(1 / (rules.calibration.cells + 1), 6)}


def set_promise(rules: CallRules) -> str:
    calibration, alpha = rules.calibration, rules.set_alpha
    smallest = 1 / (calibration.cells + 1)
    if alpha < smallest:
        return (f"the model's {calibration.cells:,} calibration cells support alpha {smallest:.2g} or more: at alpha {alpha:g} no "
                f"threshold exists, so every set holds every type (covering trivially); use alpha {smallest:.2g} or more, or "
                "calibrate on more cells")
    text = (f"each set holds the true type for at least {percent(1 - alpha, alpha)} of cells like the model's {calibration.cells:,} "
            "calibration cells (same kind of data); for other data it is a measurement, not a promise")
    if calibration.optimistic:
        text += "; this model's calibration cells were in its base model's training data, so it is optimistic"
    return text


def neighbours_report(reference, k: int, alpha: float, tally, reference_only: bool = False) -> dict:
    """What the reference's neighbours said over the run."""
    cells = max(tally.cells, 1)
    report = reference.describe() | {"k": k, "weighting": "1/cosine distance (SCimilarity's)", "labels_called": dict(tally.knn_labels.most_common()),
                                     "agree_with_head": None if reference_only else round(tally.knn_agree / cells, 4)}
    if reference.novelty is not None:
        report["novelty"] = {"rule": f"knn_novelty_p <= {alpha:g} among {len(reference.novelty.pooled_distances):,} held-out reference cells",
                             "novel_cells": tally.knn_novel}
    return report
