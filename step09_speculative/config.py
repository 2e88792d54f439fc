"""The flags of speculative decoding (vLLM's names where vLLM has the setting)."""
from __future__ import annotations

import dataclasses

from shared.config import flag_field

METHODS = ("none", "ngram", "draft")
DRAFTS = ("int4", "early-exit")
# k by method, measured on the default model (README): n-gram drafts are free and the int8 kernel
# takes rows in fours, so 8 fed rows cost what 5 do; a draft model's tokens cost ~0.9 of the target's.
DEFAULT_K = {"none": 0, "ngram": 7, "draft": 1}


@dataclasses.dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    speculative_method: str = flag_field(
        "ngram", "who proposes tokens: ngram (prompt lookup: the tokens that followed the latest earlier "
        "occurrence of the sequence's last n tokens), draft (a cheaper form of the served model: "
        "--speculative-draft), none (step 08)", choices=METHODS)
    num_speculative_tokens: int = flag_field(0, "most tokens proposed per sequence per step (k); 0: the method's "
                                             "default, measured (README): ngram 7, draft 1")
    prompt_lookup_min: int = flag_field(2, "ngram: the shortest suffix n-gram looked up")
    prompt_lookup_max: int = flag_field(4, "ngram: the longest suffix n-gram looked up (the longest match wins)")
    speculative_draft: str = flag_field("int4", "draft: int4 (step 08's int4 copy of the model) or early-exit "
                                        "(the model's first --speculative-draft-layers layers)", choices=DRAFTS)
    speculative_draft_layers: int = flag_field(12, "early-exit draft: how many of the model's first layers it runs")
    speculative_max_verify_tokens: int = flag_field(
        8, "most tokens the decodes of one step may feed when they verify: each of n decodes gets "
        "min(k, this // n - 1) drafts, so with more than half this many decodes nobody speculates "
        "(verifying is not free on a CPU: README); 0: no limit")

    @property
    def k(self) -> int:
        """The most drafts per sequence per step, the default resolved."""
        return self.num_speculative_tokens or DEFAULT_K[self.speculative_method]

    def __post_init__(self) -> None:
        if self.speculative_method not in METHODS:
            raise ValueError(f"--speculative-method must be one of {METHODS}, got {self.speculative_method!r}")
        if not 0 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"--num-speculative-tokens must be in [0, 16] (0: the method's default), got "
                             f"{self.num_speculative_tokens}")
        if self.prompt_lookup_min < 1:
            raise ValueError(f"--prompt-lookup-min must be >= 1, got {self.prompt_lookup_min}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"--prompt-lookup-max must be >= --prompt-lookup-min ({self.prompt_lookup_min}), "
                             f"got {self.prompt_lookup_max}")
        if self.speculative_draft not in DRAFTS:
            raise ValueError(f"--speculative-draft must be one of {DRAFTS}, got {self.speculative_draft!r}")
        if self.speculative_draft_layers < 1:
            raise ValueError(f"--speculative-draft-layers must be >= 1, got {self.speculative_draft_layers}")
        if self.speculative_max_verify_tokens < 0:
            raise ValueError(f"--speculative-max-verify-tokens must be >= 0, got {self.speculative_max_verify_tokens}")
