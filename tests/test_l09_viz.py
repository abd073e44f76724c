"""Lesson 09's pictures: the sampling panels show exactly what the real processors compute,
the beam trie merges shared prefixes and keeps every pruned proposal, and both figures are
deterministic."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from nanoengine.outputs import Logprob  # noqa: E402
from nanoengine.sampling.beam_search import BeamSearchOutput, BeamSearchSequence  # noqa: E402
from nanoengine.sampling.processors import (  # noqa: E402
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)
from nanoengine.viz import (  # noqa: E402
    beam_tree,
    beam_trie,
    example_beam_output,
    example_logits,
    sampling_distributions,
    sampling_effects,
)
from nanoengine.viz.examples import BEAM_PROMPT, BEAM_VOCAB, EXAMPLE_VOCAB  # noqa: E402
from nanoengine.viz.style import figure_png  # noqa: E402

pytestmark = pytest.mark.l09

SETTINGS = dict(temperature=0.5, top_k=3, top_p=0.7, min_p=0.2, repetition_penalty=1.5, presence_penalty=0.4,
                frequency_penalty=0.6, previous_tokens=(1, 1, 1, 4, 9))


def test_example_logits_are_fixed():
    logits = example_logits()
    assert logits.shape == (len(EXAMPLE_VOCAB),) and logits.dtype == torch.float32
    assert torch.equal(logits, example_logits())
    assert (logits < 0).any() and (logits > 0).any(), "both rules of the repetition penalty should show"


@pytest.mark.parametrize("settings", [{}, SETTINGS])
def test_panels_are_the_processors_distributions(settings):
    logits = example_logits()
    got = sampling_distributions(logits, **settings)
    defaults = dict(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3, presence_penalty=0.5,
                    frequency_penalty=0.3, previous_tokens=(0, 0, 2, 8))
    s = {**defaults, **settings}
    row, vocab = logits[None], logits.shape[0]
    counts = torch.zeros(1, vocab, dtype=torch.long)
    for t in s["previous_tokens"]:
        counts[0, t] += 1
    none = torch.zeros(1, vocab, dtype=torch.bool)

    def t(value, dtype=torch.float32):
        return torch.tensor([value], dtype=dtype)

    expected = {
        "original": row,
        "temperature": apply_temperature(row, t(s["temperature"])),
        "top_k": apply_top_k(row, t(s["top_k"], torch.long)),
        "top_p": apply_top_p(row, t(s["top_p"])),
        "min_p": apply_min_p(row, t(s["min_p"])),
        "repetition": apply_penalties(row, none, counts, t(0.0), t(0.0), t(s["repetition_penalty"])),
        "presence_frequency": apply_penalties(row, none, counts, t(s["presence_penalty"]),
                                              t(s["frequency_penalty"]), t(1.0)),
    }
    assert list(got) == list(expected)
    for name, values in expected.items():
        torch.testing.assert_close(got[name], values.softmax(-1)[0], msg=name)
        assert math.isclose(got[name].sum().item(), 1.0, rel_tol=1e-5)
    assert int((got["top_k"] > 0).sum()) == s["top_k"]
    for name in ("top_k", "top_p", "min_p"):
        removed = torch.isinf(expected[name][0])
        assert removed.any() and (got[name][removed] == 0).all() and (got[name][~removed] > 0).all(), name


def test_penalties_move_only_previous_tokens():
    probs = sampling_distributions(example_logits(), previous_tokens=(0, 0, 2))
    logits = {name: p.log() - p.log()[5] for name, p in probs.items()}  # logits up to a constant
    for name in ("repetition", "presence_frequency"):
        moved = (logits[name] - logits["original"]).abs() > 1e-4
        assert moved.nonzero().flatten().tolist() == [0, 2], name
    assert logits["presence_frequency"][0] - logits["original"][0] == pytest.approx(-0.5 - 2 * 0.3, abs=1e-4)


def test_sampling_effects_draws_removed_tokens_as_empty_bars_and_is_deterministic():
    logits = example_logits()
    fig = sampling_effects(logits, labels=EXAMPLE_VOCAB)
    assert isinstance(fig, Figure)
    removed = sum(p.get_gid() == "removed" for ax in fig.axes for p in ax.patches)
    assert removed == sum(int((p == 0).sum()) for p in sampling_distributions(logits).values())
    assert figure_png(fig) == figure_png(sampling_effects(example_logits(), labels=EXAMPLE_VOCAB))
    with pytest.raises(ValueError, match="labels"):
        sampling_effects(logits, labels=EXAMPLE_VOCAB[:3])
    with pytest.raises(ValueError, match="1-D"):
        sampling_distributions(logits[None])


def _proposals(**logprobs: float) -> dict[int, Logprob]:
    return {int(name[1:]): Logprob(value) for name, value in logprobs.items()}


def _beam(tokens: list[int], proposals: list[dict[int, Logprob]]) -> BeamSearchSequence:
    cum = sum(p[t].logprob for p, t in zip(proposals, tokens[1:]))
    return BeamSearchSequence(tokens, list(proposals), cum)


def test_beam_trie_of_the_example():
    output = example_beam_output()
    nodes = beam_trie(output, len(BEAM_PROMPT))
    words = {i: BEAM_VOCAB[n.token] for i, n in enumerate(nodes) if n.token is not None}
    leaves = [i for i, n in enumerate(nodes) if not n.children]
    assert len(leaves) == len(output.sequences) == 3
    assert len(nodes) == 1 + 5 + 4, "'sat on the' is shared by the two best beams"
    assert [nodes[i].ranks for i in leaves] == [[1], [2], [3]]
    for leaf, sequence in zip(leaves, output.sequences):
        path, i = [], leaf
        while nodes[i].parent is not None:
            path.append(nodes[i].token)
            i = nodes[i].parent
        assert path[::-1] == sequence.tokens[len(BEAM_PROMPT):]
        assert nodes[leaf].cum_logprob == sequence.cum_logprob
    assert [words[c] for c in nodes[0].children] == ["sat", "is"]
    assert [BEAM_VOCAB[t] for t, _ in nodes[0].pruned] == ["was", "ran"]
    the = next(i for i, n in enumerate(nodes) if len(n.children) == 2 and n.parent is not None)
    assert [words[c] for c in nodes[the].children] == ["mat", "sofa"]
    assert [BEAM_VOCAB[t] for t, _ in nodes[the].pruned] == ["box", "bed"]
    for node in nodes[1:]:
        assert node.logprob is not None and node.depth == nodes[node.parent].depth + 1


def test_beam_trie_merges_prefixes_and_keeps_every_proposal():
    """Token ids: prompt 1; step 1 proposes 10, 11, 12; step 2 from 10 proposes 20, 21, 22."""
    step1 = _proposals(t10=-0.1, t11=-0.5, t12=-2.0)
    from_10 = _proposals(t20=-0.2, t21=-0.3, t22=-3.0)
    from_11 = _proposals(t20=-0.4, t23=-0.9)
    beams = [_beam([1, 10, 20], [step1, from_10]), _beam([1, 10, 21], [step1, from_10]),
             _beam([1, 11, 20], [step1, from_11]), _beam([1, 10, 20], [step1, from_10])]
    nodes = beam_trie(BeamSearchOutput(beams), prompt_len=1)
    assert [(n.token, n.parent, n.depth) for n in nodes] == [(None, None, 0), (10, 0, 1), (20, 1, 2), (21, 1, 2),
                                                             (11, 0, 1), (20, 4, 2)]
    assert [n.ranks for n in nodes] == [[], [], [1, 4], [2], [], [3]], "a repeated beam ends on the same leaf"
    assert [[t for t, _ in n.pruned] for n in nodes] == [[12], [22], [], [], [23], []]
    assert [n.logprob.logprob for n in nodes[1:]] == [-0.1, -0.2, -0.3, -0.5, -0.4]
    assert sum(1 for n in nodes if n.ranks) == 3, "leaves are the distinct beams"


def test_beam_tree_draws_labels_and_is_deterministic():
    output = example_beam_output()
    fig = beam_tree(output, len(BEAM_PROMPT), labels=BEAM_VOCAB.__getitem__)
    assert isinstance(fig, Figure)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "The cat" in texts and any(t.startswith("#1  cum logprob") for t in texts)
    nodes = beam_trie(output, len(BEAM_PROMPT))
    lines = [line.get_gid() for line in fig.axes[0].lines]
    assert lines.count("kept") == len(nodes) - 1
    assert lines.count("pruned") == sum(len(n.pruned) for n in nodes)
    assert figure_png(fig) == figure_png(beam_tree(example_beam_output(), 2, labels=BEAM_VOCAB.__getitem__))
    unlabelled = [t.get_text() for t in beam_tree(output, 2).axes[0].texts]
    assert "sat −0.50" in unlabelled, "without labels, the logprobs' decoded tokens are used"
    assert isinstance(beam_tree(BeamSearchOutput([]), 2), Figure)
