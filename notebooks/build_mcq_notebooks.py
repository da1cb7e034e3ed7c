"""Regenerate the Study C figure notebooks (notebooks/mcq_circuits/*.ipynb) from this file.

    python notebooks/build_mcq_notebooks.py

Every notebook: a Markdown cell (what the figure is, which paper figure, definitions and rules), a
``parameters`` cell for papermill, then load -> table of plotted numbers -> figure + caption (model,
N) -> save PNG and CSV. The notebooks only read artifacts; the logic is in
:mod:`mechrepro.studies.mcq_circuits.plotting`.
"""

from pathlib import Path

import nbformat
from build_notebooks import assemble, write_all

OUT = Path(__file__).resolve().parent / "mcq_circuits"
PAPER = ("Lieberum et al. 2023, *Does Circuit Analysis Interpretability Scale? Evidence from Multiple Choice "
         "Capabilities in Chinchilla* (arXiv 2307.09458)")

DEFS = ("- **Prompt**: optional prelude line, the question, options `A. …` to `D. …` on their own lines, then "
        "`Answer:`; the model's next token is read at the final position (`:`).\n"
        "- **LD** = logit(correct answer token) − mean logit(the other options' answer tokens), answer token = "
        "`' ' + label`.\n"
        "- **Accuracy** = share of questions whose correct answer token has the highest logit among the options'; "
        "**loss** = cross-entropy over the options' answer tokens.\n"
        "- The analyses (DLA, patching, categories, low rank) use the normal-label (ABCD) questions the model answers "
        "correctly (at most `mcq.n_analysis`), as in the paper, so the label step is isolated from knowledge.\n")
ORGANISM = ("**The model.** By default (`mcq.model: organism`) the subject is a small Llama-style transformer "
            "(grouped-query attention, GPT-2 BPE tokens) trained by the pipeline on synthetic questions whose answer "
            "is determined by the prompt: category membership (*Which of these is a fruit?*), facts stated in "
            "context (*Tom has a dog. What does Tom have?*) and copying (*Which option says dog?*). It trains on the "
            "label sets `mcq.organism.train_label_sets` — by default normal ABCD and random letters: random letters "
            "teach it that labels are arbitrary tokens to copy, as pretraining does for a real model. Numbers, "
            "other ordered letters, shuffled ABCD, the `)` separator and the missing prelude are **never seen**, so "
            "on those the mutation experiment tests generalisation, as in the paper; on random letters it does not "
            "(the organism was trained on them), which must be kept in mind when comparing with the paper's "
            "\"only part of the performance with random letters\". The real-model path (`mcq.model: "
            "hf:Qwen/Qwen2.5-0.5B`, MMLU) runs the same notebooks.\n")
CATS = ("**Category rules** (first match wins; attention is the final position's, averaged over prompts; "
        "`mcq_analysis.CATEGORY_RULES`):\n\n"
        "- *correct-letter*: attention to the four labels ≥ 0.2 and, of it, ≥ 50 % on the correct option's label "
        "(chance 25 %).\n"
        "- *content-gatherer*: attention to the correct option's content tokens ≥ 0.2 and ≥ 2 × the mean "
        "attention to another option's content.\n"
        "- *single-letter*: attention to the labels ≥ 0.2 with ≥ 50 % of it on one fixed list position whichever "
        "option is correct, or ≥ 60 % of the head's summed |DLA by correct letter| from one letter (it matters "
        "only when that letter is correct).\n"
        "- *uniform*: attention to the labels ≥ 0.2, every list position getting 15–35 % of it.\n"
        "- *amplification*: attention to the `Answer:` tokens (incl. the final position) ≥ 0.3 and positive mean "
        "DLA (it boosts the letter already in the residual stream).\n"
        "- *other*: none of these.\n")

FIGURES = {
    "accuracy_table": dict(
        title="Accuracy on normal labels and on each label mutation",
        replicates="the label-mutation accuracy comparison (§ 4, mutations of the labels)",
        body="Bars: accuracy (left) and loss (right) per label set, over every evaluated question. Blue: label sets "
             "seen in training (organism only); orange: mutations never seen. The CSV adds the LD and the accuracy "
             "split by the correct position.\n\n" + DEFS + "\n" + ORGANISM,
        data="data = plotting_mcq.accuracy_data(art)\ndata",
        plot="fig = plotting_mcq.plot_accuracy(data)\n"
             "plotting_mcq.add_caption(fig, plotting_mcq.caption(art, f'{int(data.n.iloc[0])} questions per label set', "
             "'Chance: 0.25 accuracy, loss ln 4 = 1.386.'))",
    ),
    "dla": dict(
        title="Direct logit attribution at the final position",
        replicates="the direct-logit-attribution figures (§ 3.1: a few heads carry the correct letter)",
        body="Left: layer × head heatmap of the mean DLA of each head's output to LD. Middle: each MLP's DLA "
             "(error bars: standard error over prompts). Right: share of the summed |DLA| of all heads and MLPs "
             "carried by the top-k nodes.\n\nDLA: the node's output at the final position through the final norm "
             "with its scale frozen at the clean run's value and through the unembedding, projected on the LD "
             "direction; heads, MLPs, the embedding and the biases sum to LD exactly (checked in the DLA "
             "artifact, `max_abs_sum_error`).\n\n" + DEFS,
        data="data = plotting_mcq.dla_data(art)\nsummary = art.json('dla.json')\n"
             "data.reindex(data.dla.abs().sort_values(ascending=False).index).head(15)",
        plot="fig = plotting_mcq.plot_dla(data, summary)\n"
             "plotting_mcq.add_caption(fig, plotting_mcq.caption(art, f\"{summary['n']} correctly answered ABCD "
             "questions\", f\"Mean LD {summary['ld']:.2f}; the parts sum to it within "
             "{summary['max_abs_sum_error']:.1e}.\"))",
    ),
    "patching": dict(
        title="Activation patching: total vs direct effect of every head and MLP",
        replicates="the activation-patching scatter of total vs direct effect (§ 3.2; the paper's L24 H18 has a "
                   "large total but small direct effect)",
        body="Each node's output at the final position is replaced by its value on the *content-permuted* prompt "
             "(the same question with the option contents cyclically shifted, so the correct content sits under "
             "another letter). **Total effect**: change of the clean prompt's LD with everything downstream "
             "recomputed — only the final token, from the patched layer on, over the cached keys and values of the "
             "clean prefix (the engine's END-only patch). **Direct effect**: the change through the node's own path "
             "to the logits only (downstream frozen, final-norm scale frozen). Negative = the node carries the "
             "correct answer. Points marked (!) have a large total but small direct effect (|total| ≥ 0.5 × the "
             "largest |total| and |direct| < 0.3 × |total|): they act through later nodes.\n\n" + DEFS,
        data="data = plotting_mcq.patching_data(art)\nsummary = art.json('patching.json')\n"
             "data.reindex(data.total_effect.abs().sort_values(ascending=False).index).head(15)",
        plot="fig = plotting_mcq.plot_patching(data, summary)\n"
             "plotting_mcq.add_caption(fig, plotting_mcq.caption(art, f\"{summary['n']} correctly answered ABCD "
             "questions\", 'Flagged (large total, small direct): ' + (', '.join(summary['flagged']) or 'none') + '.'))",
    ),
    "head_categories": dict(
        title="Head categories from attention statistics, and effects split by the correct letter",
        replicates="the head taxonomy (§ 3.3: correct-letter, single-letter, uniform, amplification heads and "
                   "content gatherers)",
        body="Left: the category of every head (cell text: share of the label attention on the correct label / "
             "total attention to the four labels). Right: the heads with the largest |DLA|, their DLA split by "
             "which letter is correct (a single-letter head matters for one letter only).\n\n" + CATS + "\n" + DEFS,
        data="data = plotting_mcq.heads_data(art)\n"
             "data.reindex(data.dla.abs().sort_values(ascending=False).index).head(12)",
        plot="fig = plotting_mcq.plot_heads(data)\n"
             "counts = data.category.value_counts().to_dict()\n"
             "plotting_mcq.add_caption(fig, plotting_mcq.caption(art, f\"{art.json('heads.json')['n']} correctly "
             "answered ABCD questions\", f'Category counts: {counts}.'))",
    ),
    "low_rank": dict(
        title="Low-rank compression of the top correct-letter head",
        replicates="the low-rank analysis of the correct-letter heads (§ 4.1: q and k compress to 3 dimensions; "
                   "keys cluster by position in the list)",
        body="The head: the correct-letter head with the largest DLA (if no head meets the correct-letter rule, the "
             "head with the largest DLA; the title says which). Its query at the final position and its keys / "
             "values at the four label positions are collected on half of the analysis questions (the fit half); "
             "each is replaced by `mean + P_r (x − mean)`, `P_r` the projection on its top-r principal directions "
             "(the discarded directions keep their mean). Left: loss on the other half vs r, compressing q, k or v "
             "alone or all three, with the full head and the mean-ablated head (its output at the final position "
             "replaced by its mean) as references. On grouped-query models the keys and values compressed are this "
             "query head's own (per-head inputs), so the other heads of its key/value group are untouched. Middle "
             "and right: the keys at the label positions in their top-3 principal directions, coloured by list "
             "position and by letter (normal and random-letter prompts): the paper finds they cluster by "
             "position — an \"Nth item in an enumeration\" feature.\n\n" + DEFS,
        data="data = plotting_mcq.low_rank_data(art)\nlr = art.json('low_rank.json')\nkeys = art.csv('low_rank_keys.csv')\n"
             "data",
        plot="fig = plotting_mcq.plot_low_rank(data, lr, keys)\n"
             "plotting_mcq.add_caption(fig, plotting_mcq.caption(art, f\"{lr['n_fit']} fit + {lr['n_test']} test "
             "questions\", f\"Loss: full head {lr['full']['loss']:.3f}, mean-ablated {lr['ablated']['loss']:.3f}. \"\n"
             "    f\"This head ({metrics['low_rank']['head_category']}) puts {metrics['low_rank']['head_label_attention']:.3f} \"\n"
             "    'of its attention on the labels: when that is small, compressing its keys and values at the labels '\n"
             "    'cannot matter and a flat curve says nothing about an enumeration feature.'))",
    ),
    "fig11_mutations": dict(
        title="Figure 11 — label mutations with the full, low-rank and mean-ablated head",
        replicates="Figure 11",
        body="For each label set: accuracy (left) and loss (right) on the questions answered correctly with normal "
             "labels, with the head of the low-rank figure (1) unchanged, (2) low-rank — q, k and v each projected "
             "to rank `mcq.low_rank.mutation_rank` with the directions fitted on *normal* labels, (3) mean-ablated "
             "at the final position. The paper: the low-rank head keeps performance on several mutations, only "
             "part of it with random letters and little with numbers, so the \"Nth item\" feature is only a partial "
             "explanation. Label sets marked * were seen in training (organism).\n\n" + ORGANISM + "\n" + DEFS,
        data="data = plotting_mcq.mutations_data(art)\ndata",
        plot="fig = plotting_mcq.plot_mutations(data)\n"
             "plotting_mcq.add_caption(fig, plotting_mcq.caption(art, 'the normal-label-correct questions: ' + "
             "', '.join(f'{s} {int(n)}' for s, n in data.groupby('label_set', sort=False).n.first().items()), "
             "f\"The head ({metrics['low_rank']['head_category']}) puts {metrics['low_rank']['head_label_attention']:.3f} \"\n"
             "    'of its attention on the labels; the low-rank edit only touches its query and its keys/values at the labels.'))",
    ),
}


def build(name: str, spec: dict) -> nbformat.NotebookNode:
    md = (f"# {spec['title']}\n\nReplicates **{spec['replicates']}** of {PAPER}, on the configured model "
          f"(named in the caption).\n\n{spec['body']}\n\nThis notebook only reads the artifacts under `results_dir` "
          "and writes `{figures_dir}/{fig_name}.png` and `.csv` (the plotted numbers).")
    params = ('results_dir = "results/mcq_circuits"\nfigures_dir = "figures/mcq_circuits"\n'
              f'fig_name = "{name}"\ndpi = 150')
    setup = ("from IPython.display import Image, display\n\nfrom mechrepro.studies.mcq_circuits import plotting as plotting_mcq\n\n"
             "art = plotting_mcq.load(results_dir)\nmetrics = art.metrics")
    return assemble(name, md, params, setup, spec, "plotting_mcq")


def main() -> None:
    write_all(OUT, FIGURES, build)


if __name__ == "__main__":
    main()
