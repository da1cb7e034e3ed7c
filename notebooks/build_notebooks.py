"""Regenerate the Study A figure notebooks (notebooks/ioi_generalization/*.ipynb) from this file.

    python notebooks/build_notebooks.py

Every notebook: a Markdown cell (what the figure is, which paper figure, definitions), a ``parameters``
cell for papermill, then load -> table of plotted numbers -> figure + caption -> save PNG and CSV.
The notebooks only read artifacts; the logic is in :mod:`mechrepro.studies.ioi_generalization.plotting`.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parent / "ioi_generalization"
PAPER = ("Nainani et al. 2024, *Adaptive Circuit Behavior and Generalization in Mechanistic Interpretability* "
         "(arXiv 2411.16105)")

LD = ("- **LD** (logit difference) = logit(IO) − logit(S) at the END (last) position, mean over prompts.\n"
      "- **Circuit LD**: the same with every (head, position) outside the circuit mean-ablated — its output `z` "
      "replaced by its mean over the variant's ABC prompts (every name slot refilled with distinct random names), "
      "means taken per template. Each circuit head is kept only at its class's positions: name movers, negative "
      "name movers and S-inhibition heads at END, induction and duplicate-token heads at S2, previous-token heads "
      "at S1+1.\n"
      "- **Faithfulness** = circuit LD / model LD.\n")
ATTN = ("- **Attention to the correct / incorrect token(s)** (`ATTENTION_ROLES` in `ioi_analysis.py`), from the "
        "head's query position: name movers END → IO1/IO2/IO3 (summed) vs S; S-inhibition END → S2 vs IO2 "
        "(IO1 in Base IOI); induction S2 → S1+1 vs IO1+1; duplicate token S2 → S1 vs IO1; previous token "
        "S1+1 → S1 vs IO1.\n")
CAPTION = "The caption names the model (its recorded description), N, the circuit method and the ablation."

FIGURES = {
    "circuit_discovery": dict(
        title="IOI circuit discovery (path patching)",
        replicates="the circuit-discovery procedure of Wang et al. 2022 that Nainani et al. (§5.2) rerun; "
                   "no single paper figure",
        body="Heatmaps layer × head of the four discovery steps, circuit heads labelled with their class.\n\n"
             "Discovery follows Wang et al.'s procedure, backwards from the logits, on base IOI prompts with their "
             "ABC prompts as the corrupted source (each step's effect is the relative change of the mean logit "
             "difference, `(LD_patched - LD_clean) / LD_clean`):\n\n"
             "1. **Name movers / negative name movers** — path patching head → logits at END (direct path). Most "
             "negative effects are name movers, most positive negative name movers.\n"
             "2. **S-inhibition heads** — path patching head → name movers' queries at END.\n"
             "3. **Induction and duplicate-token heads** — path patching head → S-inhibition heads' values at S2; "
             "split by attention at S2: to S1+1 (induction) or to S1 (duplicate token).\n"
             "4. **Previous-token heads** — path patching head → induction heads' keys at S1+1.\n\n"
             "Steps 2–4 rank every candidate sender with attribution patching (one backward pass) and confirm the "
             "`confirm_top_k` best exactly (`method: attribution`), or patch every candidate exactly "
             "(`method: exact`). A class keeps the heads whose exact effect passes its threshold. In the heatmaps "
             "a cell shows the exact effect where it was computed (outlined when only some were) and the "
             "attribution estimate elsewhere; grey cells are not senders of that step.",
        data="data = plotting.discovery_data(art)\ndata.head(20)",
        plot="fig = plotting.plot_discovery(data, art)\n"
             "plotting.add_caption(fig, plotting.caption(metrics, n=plotting.discovery_n(art), "
             "note=plotting.discovery_note(data)))",
    ),
    "table1_faithfulness": dict(
        title="Table 1 — faithfulness of the base circuit on each variant",
        replicates="Table 1",
        body="Grouped bars: model LD and circuit LD per variant (error bars: standard error over prompts), "
             "faithfulness above each pair. The CSV is the table (plus accuracy = fraction of prompts with "
             "LD > 0, and mean P(IO)).\n\n" + LD +
             "\nFaithfulness > 1 on the variants is the paper's \"S2 Hacking\" artifact.",
        data="data = plotting.table1_data(art)\ndata",
        plot="fig = plotting.plot_table1(data)\n"
             "plotting.add_caption(fig, plotting.caption(metrics, note='Error bars: standard error of the mean over "
             "prompts.'))",
    ),
    "fig2_attention_shift": dict(
        title="Figure 2 — attention shift of the circuit heads between Base IOI and the variants",
        replicates="Figure 2",
        body="Per circuit head: mean over prompts of (attention to the correct token(s) on the variant − the same "
             "on Base IOI), for the full model and for the circuit (everything else mean-ablated). Prompts are "
             "paired by index (same names, template and order in every variant); error bars are the standard "
             "error of the paired differences.\n\n" + ATTN + LD,
        data="data = plotting.attention_shift_data(art)\ndata",
        plot="fig = plotting.plot_attention_shift(data)\n"
             "n = int(data.n.max()) if len(data) else 0\n"
             "plotting.add_caption(fig, plotting.caption(metrics, n=f'{n} prompt pairs per variant', "
             "note=plotting.ATTENTION_NOTE + plotting.CLASS_KEY + '.'))",
    ),
    "fig3_sinh_attention": dict(
        title="Figure 3 — S-inhibition head attention at END on a DoubleIO prompt",
        replicates="Figure 3 (head 8.6 in GPT-2 small; here the model's top S-inhibition head)",
        body="Left: attention from END of the first S-inhibition head of the circuit (the strongest in discovery) on "
             "the first DoubleIO prompt, over that prompt's tokens, full model vs circuit. Right: the same head's "
             "mean attention from END to S2 and to IO2 over all DoubleIO prompts (± standard error).\n\n"
             "The paper's finding: the model splits attention between IO2 and S2, the circuit attends mainly to "
             "S2 (the IO2 → duplicate-token paths are ablated).\n\n" + LD,
        data="data = plotting.sinh_attention_data(art)\ndata",
        plot="fig = plotting.plot_sinh_attention(data)\n"
             "plotting.add_caption(fig, plotting.caption(metrics, note='Left: one prompt; right: mean over all '"
             "'DoubleIO prompts. Role tags: S1/S2 = subject, IO1/IO2 = indirect object, END = query position.'))",
    ),
    "fig4_confidence_ratio": dict(
        title="Figure 4 — confidence ratio and functional faithfulness per head (DoubleIO)",
        replicates="Figure 4",
        body="Over the first `n_samples` DoubleIO prompts, per circuit head (mean ± standard error over prompts):\n\n"
             "- **Confidence ratio** = Attn(correct) / Attn(incorrect), for the full model and for the circuit.\n"
             "- **Functional faithfulness** = Attn_circuit(correct) / Attn_model(correct), per prompt.\n\n"
             + ATTN + LD + "\nThe y axis is logarithmic when the ratios span more than a factor 50.",
        data="data = plotting.confidence_ratio_data(art, n_samples=n_samples)\ndata",
        plot="fig = plotting.plot_confidence_ratio(data)\n"
             "n = int(data.n.max()) if len(data) else 0\n"
             "plotting.add_caption(fig, plotting.caption(metrics, n=f'first {n} DoubleIO prompts (n_samples = "
             "{n_samples})', note=plotting.ATTENTION_NOTE + plotting.CLASS_KEY + '.'))",
    ),
    "fig5_restored_paths": dict(
        title="Figure 5 + Table 2 — restoring the paths from the repeated IO tokens",
        replicates="Figure 5 and Table 2",
        body="Circuit LD on DoubleIO and TripleIO when the duplicate-token and induction heads are kept at other "
             "tokens than S2, and the previous-token heads at the matching positions (`RESTORE_ROLES` in "
             "`circuit.py`: S2 ↔ S1+1, IO2 ↔ IO1+1, IO3 ↔ IO1+1; \"all tokens\" keeps them at every position). "
             "The dashed line is the full-model LD; F = circuit LD / model LD.\n\n"
             "Table 2 is the circuit with the IO-duplicate paths added (DoubleIO: S2 + IO2, TripleIO: "
             "S2 + IO2 + IO3). **Edges** (`count_edges` in `circuit.py`): every sender head at each of its kept "
             "positions joined to every receiver head of the class it feeds (previous token → induction keys, "
             "induction/duplicate → S-inhibition values, S-inhibition → name-mover queries, name movers → "
             "logits). Edge overlap = shared edges with the base circuit / edges.\n\n" + LD,
        data="data = plotting.restored_data(art)\ndata",
        plot="fig = plotting.plot_restored(data)\n"
             "plotting.add_caption(fig, plotting.caption(metrics, note=plotting.RESTORED_NOTE))",
    ),
    "fig6_value_paths": dict(
        title="Figure 6 — paths into the S-inhibition heads' values",
        replicates="Figure 6",
        body="Effect (% of clean LD) of each earlier head's path into the S-inhibition values. The sender's output "
             "change (ABC − clean) at `source_role` (S2 or IO2) is added to the value input of the S-inhibition "
             "heads at the same position. All senders are ranked by attribution; the circuit's early heads and the "
             "`confirm_top_k` best are patched exactly. Only exact effects are plotted, grouped by setting: "
             "Base IOI from S2, DoubleIO from S2, DoubleIO from IO2.\n\n"
             "The paper's finding: the same heads act from IO2 with the opposite sign.",
        data="data = plotting.value_paths_data(art)\ndata",
        plot="fig = plotting.plot_value_paths(data)\n"
             "plotting.add_caption(fig, plotting.caption(metrics, n=plotting.value_paths_n(art), "
             "note=plotting.VALUE_PATHS_NOTE))",
    ),
    "fig8_name_order": dict(
        title="Figure 8 — logit difference by name order",
        replicates="Figure 8 (LD panel; the paper shows DoubleIO, here every variant)",
        body="Mean LD over the prompts of each name order, full model vs circuit (error bars: standard error). "
             "**ABBA** = IO named first (\"When John and Mary …, Mary gave …\" → IO John), **BABA** = S named "
             "first.\n\n" + LD,
        data="data = plotting.name_order_data(art)\ndata",
        plot="fig = plotting.plot_name_order(data)\n"
             "plotting.add_caption(fig, plotting.caption(metrics, note='n per order under each group; error bars: '"
             "'standard error of the mean over prompts.'))",
    ),
    "head_patching_attribution": dict(
        title="Attribution patching vs exact activation patching",
        replicates="no paper figure: the check of the patching engine's attribution ranking (issue: performance)",
        body="Every head's output `z` in the clean base prompts is replaced by its output on the ABC prompt, at "
             "END only or at all positions, and the relative change of the mean LD is measured exactly by the "
             "patching engine (`mechrepro.core.engine`). Attribution patching estimates the same effects to first order "
             "from one forward and one backward pass: `<dLD/dz, z_ABC - z_clean>`. Titles give the Spearman rank "
             "correlation and the top-k overlap (by |effect|); the five largest exact effects are labelled.",
        data="data = plotting.head_patching_data(art)\nsummary = plotting.head_patching_summary(art)\ndata.head()",
        plot="fig = plotting.plot_head_patching(data, summary)\n"
             "plotting.add_caption(fig, plotting.caption(metrics, n=f\"{summary.get('n_prompts')} base prompts\", circuit=False, "
             "note=f\"Each point is one head; dashed: attribution = exact. All positions: the {summary.get('all_positions_exact_heads', '?')} heads ranked highest by attribution were patched exactly.\"))",
    ),
}


def assemble(name: str, md: str, params: str, setup: str, spec: dict, plotter: str) -> nbformat.NotebookNode:
    """One figure notebook (shared by every study's builder): Markdown, the papermill ``parameters``
    cell, ``setup`` (imports and loading), ``spec``'s data and plot cells, then the save cell calling
    ``{plotter}.save``. Cell ids are fixed, so rebuilding an unchanged notebook changes nothing."""
    params_cell = new_code_cell(params)
    params_cell.metadata["tags"] = ["parameters"]
    cells = [
        new_markdown_cell(md),
        params_cell,
        new_code_cell(setup),
        new_code_cell(spec["data"]),
        new_code_cell(spec["plot"]),
        new_code_cell(f"paths = {plotter}.save(fig, data, figures_dir, fig_name, dpi)\n"
                      "display(Image(filename=str(paths['png'])))"),
    ]
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:40]}-{i}"
    return nb


def write_all(out: Path, figures: dict, build) -> None:
    """Write ``build(name, spec)`` of every figure to ``out/<name>.ipynb``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, spec in figures.items():
        nbformat.write(build(name, spec), out / f"{name}.ipynb")
        print(out / f"{name}.ipynb")


def build(name: str, spec: dict) -> nbformat.NotebookNode:
    md = (f"# {spec['title']}\n\nReplicates **{spec['replicates']}** of {PAPER}, on the configured model "
          f"(see the caption).\n\n{spec['body']}\n\n{CAPTION} This notebook only reads the artifacts under "
          "`results_dir` and writes `{figures_dir}/{fig_name}.png` and `.csv` (the plotted numbers).")
    params = ('results_dir = "results/ioi_generalization"\nfigures_dir = "figures/ioi_generalization"\n'
              f'fig_name = "{name}"\ndpi = 150\nn_samples = 50')
    setup = ("from IPython.display import Image, display\n\nfrom mechrepro.studies.ioi_generalization import plotting\n\n"
             "art = plotting.load(results_dir)\nmetrics = art.metrics")
    return assemble(name, md, params, setup, spec, "plotting")


def main() -> None:
    write_all(OUT, FIGURES, build)


if __name__ == "__main__":
    main()
