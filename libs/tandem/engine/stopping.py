"""When a request's output ends: EOS and stop token ids, stop strings, max_tokens, the
context length. Stop strings are checked incrementally: each token's new text is searched
together with the last ``len(longest stop) - 1`` characters before it (``tandem.sampling.text``),
never the whole output again."""
from __future__ import annotations

from tandem.sampling import IncrementalDetokenizer, StopStrings

from .request import Request


class StopChecker:
    def __init__(self, eos_token_ids: set, context_length: int, tokenizer) -> None:
        self.eos_token_ids = eos_token_ids
        self.context_length = context_length
        self.tokenizer = tokenizer  # None: a checkpoint without tokenizer.json has token ids only

    def start(self, req: Request) -> None:
        """Set up a new request's stop-string state (text is needed only when it has stop strings).

        A continued request (output generated elsewhere) reads its output so far first, unarmed:
        none of it matched where it was generated, but a stop string may begin in it and end in
        the next tokens, and ``stop_text_pos`` counts the whole output's text."""
        sp = req.sampling
        if sp.stop and self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens)
            req.stops = StopStrings(sp.stop)
            if req.output_ids:
                req.stops.feed(req.detokenizer.add(req.output_ids), armed=False)

    def check(self, req: Request, tok: int) -> str | None:
        """The finish reason after ``tok`` was appended to req's output, or None to go on."""
        sp = req.sampling
        n = len(req.output_ids)
        if req.grammar is not None and req.grammar.terminated:
            return "stop"  # the grammar is complete and its stop token was sampled
        armed = n >= sp.min_tokens
        if armed and (tok in sp.stop_token_ids or (not sp.ignore_eos and tok in self.eos_token_ids)):
            return "stop"
        if req.stops is not None and req.stops.feed(req.detokenizer.add([tok]), armed):
            return "stop"
        if n >= sp.max_tokens:
            return "length"
        if req.seq_len >= self.context_length:
            return "length"
        return None
