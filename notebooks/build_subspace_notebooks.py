"""Regenerate Study B's toy and IOI figure notebooks (notebooks/subspace_illusion/*.ipynb) from this file.

    python notebooks/build_subspace_notebooks.py

Every notebook: a Markdown cell (what the figure is, which part of the paper, definitions), a
``parameters`` cell for papermill, then load -> table of plotted numbers -> figure + caption -> save
PNG and CSV. The notebooks only read artifacts; the code is in :mod:`mechrepro.studies.subspace_illusion.plotting`.
"""

from pathlib import Path

import nbformat
from build_notebooks import assemble, write_all

OUT = Path(__file__).resolve().parent / "subspace_illusion"
PAPER = ("Makelov, Lange & Nanda 2023, *Is This the Subspace You Are Looking For? An Interpretability Illusion for "
         "Subspace Activation Patching* (arXiv 2311.17030)")

PATCH = ("- **Subspace patch** along a direction v: a' = a_base + (vᵀa_src − vᵀa_base)/‖v‖² · v — the component "
         "along v comes from the source, everything orthogonal to v keeps its base value.\n")
IOI = ("- **Pairs**: a base IOI prompt (\"Then, A and B …, B … to\", ABB; or \"Then, B and A …\", BAB) and its source, "
       "the same sentence with the two first names swapped. The model answers the IO (A) in both; a patch that "
       "carries the name-position feature from the source makes it answer the base prompt's S name (B).\n"
       "- **Site**: END position, layer `subspace.layer` — `auto` takes the last layer holding an S-inhibition head "
       "of Study A's circuit, provided it lies below the first name-mover layer (after the S-inhibition heads write, "
       "before the name movers read; GPT-2's reference circuit gives the paper's layer 8).\n"
       "- **Data**: directions are learned on training pairs (templates T0–T1) and evaluated on held-out test pairs "
       "(template T2); names, places and objects are split in half between the two.\n")
DIRS = ("- **v_MLP / v_resid**: 1-D DAS directions (a unit vector trained with Adam on cached activations; "
        "cross-entropy of the patched logits against the expected name) in the MLP hidden activation (for a gated "
        "MLP: the input of the down projection) and in the residual stream after the layer.\n"
        "- **Rowspace / nullspace parts**: v = v_row + v_null; for the MLP against the out (down) projection "
        "(v_null writes nothing), for the residual stream against the span of the name movers' query weights "
        "(a proxy: the residual stream has no kernel). Each part is re-normalised before patching.\n"
        "- **v_grad**: normalised mean gradient of the name movers' attention-score difference END→pos(N1) − "
        "END→pos(N2) w.r.t. the residual at the site. **v_mean**: mean residual of ABB minus BAB prompts.\n")

FIGURES = {
    "toy_example": dict(
        title="Toy example — the illusion in a 3-unit linear network",
        replicates="the Section 3 toy example",
        body="Left: output change of each patch from the input x = −1 into x = +1. Right: the hidden units h1 "
             "(tracks the feature, but its output weight is 0: it lies in the kernel of W_out — causally "
             "disconnected) and h2 (its output weight is nonzero but it is 0 on every input — dormant), with the "
             "base and source hidden states and the state after the v patch.\n\n" + PATCH +
             "\nPatching v ∝ e1 + e2 changes the output exactly as patching the faithful unit e3 does, although "
             "neither of its parts does anything alone: v_null (∝ e1) is invisible to W_out, v_row (∝ e2) does not "
             "vary between the inputs. The v patch moves h2 by the amount h1 varies.",
        data="toy = art.json('toy.json')['toy']\ndata = plotting_subspace.toy_data(art)\ndata",
        plot="fig = plotting_subspace.plot_toy(data, toy)\n"
             "plotting_subspace.add_caption(fig, plotting_subspace.toy_caption(toy))",
    ),
    "ioi_table1": dict(
        title="Table 1 — IOI: 1-D subspace patches, their rowspace and nullspace parts, and baselines",
        replicates="Table 1",
        body="FLDD and interchange accuracy of every Table 1 row on the held-out test pairs (bars, with 95% "
             "bootstrap intervals over pairs), beside the paper's numbers ([P], filled diamonds) and, where the "
             "paper gives none, the authors' repository's saved outputs ([R], open circles) — both measured on "
             "GPT-2 small at layer 8.\n\n" + PATCH + IOI + DIRS +
             "- **FLDD** = 100·(1 − mean LD_patched / mean LD_clean), LD = logit(IO) − logit(S): 100 erases the "
             "preference for the IO, > 100 flips it. **Interchange accuracy** = share of pairs whose top token over "
             "the whole vocabulary is the expected (base S) name.\n\n"
             "The paper's illusion: v_MLP moves the output far more than the full MLP patch, its nullspace part does "
             "nothing, its rowspace part little.",
        data="data = plotting_subspace.table1_data(art, reference_file)\ndata",
        plot="fig = plotting_subspace.plot_table1(data, metrics)\n"
             "plotting_subspace.add_caption(fig, plotting_subspace.caption(metrics, "
             "note=plotting_subspace.table1_note(metrics)))",
    ),
    "ioi_projections": dict(
        title="IOI — clean activations projected on the directions, by name order",
        replicates="the projection histograms of the IOI section (v_resid separates ABB from BAB)",
        body="Histograms over the held-out test pairs of the base prompts' clean activation at END projected on "
             "each direction (top: residual stream; bottom: MLP hidden activation), coloured by name order.\n\n"
             + IOI + DIRS,
        data="data = plotting_subspace.projections_data(art)\n"
             "data.groupby(['direction', 'order']).value.describe()",
        plot="fig = plotting_subspace.plot_projections(data)\n"
             "plotting_subspace.add_caption(fig, plotting_subspace.caption(metrics, "
             "note=plotting_subspace.PROJECTIONS_NOTE))",
    ),
    "ioi_dormant_pathway": dict(
        title="IOI — the dormant pathway: MLP output projected on v_grad, with and without the v_MLP patch",
        replicates="the dormant-pathway histogram of the IOI section",
        body="Histogram over the held-out test pairs of the MLP's output at END projected on v_grad, clean and "
             "after the full-MLP, v_MLP, v_MLP-rowspace and v_MLP-nullspace patches.\n\n" + PATCH + IOI + DIRS +
             "\nThe paper's finding: the v_MLP patch pushes the MLP output along v_grad far outside its natural "
             "distribution — it activates a direction the MLP does not use on these prompts.",
        data="data = plotting_subspace.dormant_data(art)\nplotting_subspace.dormant_summary(data)",
        plot="fig = plotting_subspace.plot_dormant(data)\n"
             "plotting_subspace.add_caption(fig, plotting_subspace.caption(metrics, "
             "note=plotting_subspace.DORMANT_NOTE))",
    ),
}


def build(name: str, spec: dict) -> nbformat.NotebookNode:
    md = (f"# {spec['title']}\n\nReplicates **{spec['replicates']}** of {PAPER}, on the configured model "
          f"(see the caption).\n\n{spec['body']}\n\nThis notebook only reads the artifacts under `results_dir` "
          "and writes `{figures_dir}/{fig_name}.png` and `.csv` (the plotted numbers).")
    load = "art = plotting_subspace.load(results_dir)"
    if name != "toy_example":
        load += "\nmetrics = art.metrics"
    params = ('results_dir = "results/subspace_illusion"\nfigures_dir = "figures/subspace_illusion"\n'
              f'fig_name = "{name}"\nreference_file = "reference/published.yaml"\ndpi = 150')
    setup = "from IPython.display import Image, display\n\nfrom mechrepro.studies.subspace_illusion import plotting as plotting_subspace\n\n" + load
    return assemble(name, md, params, setup, spec, "plotting_subspace")


def main() -> None:
    write_all(OUT, FIGURES, build)


if __name__ == "__main__":
    main()
