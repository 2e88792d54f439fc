"""The rejection sampler alone, in vLLM's style: with a small vocabulary and many samples, the
distribution of the tokens it emits converges to the target's (its distance falls with the sample
count and ends below that of random reference distributions), whatever the draft proposed."""
from __future__ import annotations

import torch

from shared.sampling import draw
from step09_speculative.rejection import verify, verify_greedy

V, K = 10, 2


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum()) if not a.isnan().any() else 1.0  # no sample: as far as can be


def emitted_distributions(p: torch.Tensor, q: torch.Tensor, one_hot: bool, n: int, seed: int) -> list[torch.Tensor]:
    """Per position j, the empirical distribution of the j-th emitted token (where one was emitted).
    Drafts are drawn from ``q``; with ``one_hot`` the verifier is told nothing of ``q`` (q one-hot at
    the proposal, as for n-gram proposals)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(K + 1, V)
    for _ in range(n):
        draft = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(K)]
        for j, t in enumerate(verify(lambda j: p[j], draft, None if one_hot else q, gen)):
            counts[j, t] += 1
    return [c / c.sum() for c in counts]


def targets(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(K + 1, V, generator=g)
    p = torch.softmax(logits, dim=-1)  # positions independent of the prefix
    q = torch.softmax(logits[:K] + torch.randn(K, V, generator=g), dim=-1)  # a draft near the target
    return p, q
    return p, q


def test_emitted_tokens_follow_the_target_distribution_whatever_the_draft() -> None:
    p, q = targets(0)
    g = torch.Generator().manual_seed(1)
    references = torch.softmax(2 * torch.randn(20, V, generator=g), dim=-1)
    for one_hot in (False, True):  # a model's q, and one-hot proposals (n-gram)
        dist = {n: emitted_distributions(p, q, one_hot, n, seed=n) for n in (100, 1000, 10000)}
        for j in range(K + 1):
            d = [tv(dist[n][j], p[j]) for n in (100, 1000, 10000)]
            assert d[2] < d[0], f"position {j}: distance does not fall with samples: {d}"
            ref = min(tv(r, p[j]) for r in references)
            assert d[2] < ref / 3, f"position {j}: {d[2]:.3f} vs the closest random reference {ref:.3f}"


def test_accepting_every_draft_would_fail_the_distribution_check() -> None:
    """The check has teeth: emitting the draft's own samples (no rejection) is far from p."""
    p, q = targets(0)
    gen = torch.Generator().manual_seed(2)
    counts = torch.zeros(V)
    for _ in range(5000):
        counts[int(torch.multinomial(q[0], 1, generator=gen))] += 1
    assert tv(counts / counts.sum(), p[0]) > 0.1


def test_one_hot_proposals_consume_the_generator_as_plain_sampling_does() -> None:
    """Seeded output does not depend on what was proposed: the emitted tokens are the first
    tokens of the plain, one-draw-per-token sequence from the same seed."""
    p, _ = targets(3)
    plain_gen = torch.Generator().manual_seed(7)
    plain = [draw(p[j], plain_gen) for j in range(K + 1)]
    for draft in ([plain[0], plain[1]], [plain[0], (plain[1] + 1) % V], [(plain[0] + 1) % V, 0]):
        out = verify(lambda j: p[j], draft, None, torch.Generator().manual_seed(7))
        assert out == plain[:len(out)]
        n = next((j for j, x in enumerate(draft) if x != plain[j]), K)
        assert len(out) == n + 1  # accepted up to the first disagreement, then the plain draw


def test_seeded_verification_is_reproducible() -> None:
    p, q = targets(4)
    runs = [verify(lambda j: p[j], [3, 4], q, torch.Generator().manual_seed(11)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_greedy_accepts_while_the_draft_is_the_argmax_then_adds_one() -> None:
    assert verify_greedy([5, 6, 7], [5, 6]) == [5, 6, 7]  # all accepted: the bonus token
    assert verify_greedy([5, 6, 7], [5, 9]) == [5, 6]  # the correction replaces the rejected draft
    assert verify_greedy([5, 6, 7], [1, 6]) == [5]
