"""Regenerate Study B's factual-recall figure notebooks (notebooks/subspace_illusion/facts_*, rome_*).

    python notebooks/build_facts_notebooks.py

Every notebook: a Markdown cell (what the figure is, which paper figure, definitions), a ``parameters``
cell for papermill, then load -> table of plotted numbers -> figure + caption -> save PNG and CSV.
The notebooks only read artifacts; the logic is in :mod:`mechrepro.studies.subspace_illusion.plotting_facts`.
"""

from pathlib import Path

import nbformat
from build_notebooks import assemble, write_all

OUT = Path(__file__).resolve().parent / "subspace_illusion"
PAPER = ("Makelov, Lange & Nanda 2023, *Is This the Subspace You Are Looking For? An Interpretability Illusion "
         "for Subspace Activation Patching* (arXiv 2311.17030), Section 6")
SETUP = ("Facts (subject, relation prompt, object) the model answers correctly (top-1 = the object's first token) "
         "are paired within a relation with different objects (base, source). The site is the MLP hidden "
         "activation (the key, `blocks.{l}.mlp.hook_post`; for a gated MLP the input of the down projection) at the "
         "base's last subject token, one job per layer.")

FIGURES = {
    "facts_flips": dict(
        title="Facts — fraction of fact pairs flipped per layer",
        replicates="the per-layer fact-patching results (Section 6, figure of facts flipped by layer)",
        body=SETUP + "\n\nPer pair a unit direction v is learned (Adam on the cached keys, only the layers above "
             "the site recomputed; loss logit(base object) − logit(source object)). Lines: the fraction of pairs "
             "whose patched model prefers the source object, for the 1-D patch along v, the whole key (full-MLP "
             "patch), v's row-space and null-space parts (against W_out), and the rank-1 weight edit of W_out "
             "that equals the 1-D patch on the base key (b = Σ⁺k_base / k_baseᵀΣ⁺k_base, Σ = ROME's key second "
             "moment). The paper's 1-D curve (GPT2-XL, layers 0, 5, …, 45) is drawn against relative depth.",
        data="data = F.flips_data(art)\ndata",
        plot="fig = F.plot_flips(data, art)",
    ),
    "facts_null_norm": dict(
        title="Facts — null-space norm of the learned directions per layer",
        replicates="the nullspace-norm statistic of Section 6",
        body=SETUP + "\n\nEach learned unit direction splits into v_row (in the row space of the MLP out "
             "projection, i.e. what it can write) and v_null (its kernel: causally disconnected). A large "
             "‖v_null‖ means the patch works by combining a disconnected direction with a dormant one (the "
             "illusion). The dashed line is the value for a random unit vector, sqrt((f − r) / f).",
        data="data = F.null_norm_data(art)\ndata",
        plot="fig = F.plot_null_norm(data, art)",
    ),
    "rome_rewrite": dict(
        title="Fact editing — ROME vs its equivalent subspace intervention, rewrite scores per layer",
        replicates="the ROME → subspace-intervention comparison of Section 6 (rewrite scores by layer)",
        body=SETUP + "\n\nFor each pair the base fact is rewritten to the source's object by ROME (value "
             "optimisation + closed-form rank-1 update with Σ). The edit is converted into a 1-D subspace patch "
             "from the source's key that changes the MLP output at the base key as the edit does "
             "(`rank1_edit_to_subspace`), and into that patch's row-space part. Lines: mean rewrite scores; "
             "annotations: Pearson correlation of ROME and derived scores over the edits.",
        data="data = F.rome_data(art)\ndata",
        plot="fig = F.plot_rome(data, art)",
    ),
}


def build(name: str, spec: dict) -> nbformat.NotebookNode:
    md = (f"# {spec['title']}\n\nReplicates **{spec['replicates']}** of {PAPER}, on the configured model "
          f"(see the caption).\n\n{spec['body']}\n\nThe caption names the model and N. This notebook only reads "
          "the artifacts under `results_dir` (and the paper's numbers in `reference/published.yaml`) and writes "
          "`{figures_dir}/{fig_name}.png` and `.csv` (the plotted numbers).")
    params = ('results_dir = "results/subspace_illusion"\nfigures_dir = "figures/subspace_illusion"\n'
              f'fig_name = "{name}"\ndpi = 150')
    setup = ("from IPython.display import Image, display\n\nfrom mechrepro.studies.subspace_illusion import plotting_facts as F\n\n"
             "art = F.load(results_dir)")
    return assemble(name, md, params, setup, spec, "F")


def main() -> None:
    write_all(OUT, FIGURES, build)


if __name__ == "__main__":
    main()
