"""When a request's output ends, and its text: the stop rules the engine applies after every sampled token
(end-of-sequence ids, ``stop_token_ids``, ``stop`` strings, ``min_tokens``) and the detokenized output text.

A stop string counts only where it ends in text no earlier search covered, so one completed before
``min_tokens`` new tokens stays in the text (vLLM's rule: it searches the new text only, and the
``min_tokens``-th token itself may complete a stop string). End-of-sequence and stop ids need no such care:
the compiled step masks them until ``min_tokens`` (``jserve.engine.penalties``).
"""

from __future__ import annotations

from .records import SequenceState

__all__ = ["check_stop", "detokenize"]


def detokenize(tokenizer, seq: SequenceState, end: int | None = None) -> str:
    """``seq``'s generated text ("" without a tokenizer); of its first ``end`` tokens when given."""
    if tokenizer is None:
        return ""
    return tokenizer.decode(seq.output.token_ids[:end], skip_special_tokens=seq.params.skip_special_tokens)


def check_stop(tokenizer, seq: SequenceState, tok: int) -> bool:
    """Whether ``tok`` (just appended to ``seq``'s output) ends the request; if so, sets the output's
    ``finish_reason`` / ``stop_reason`` and its final ``text``: all of it after an end-of-sequence id, all but
    the stop token after a ``stop_token_ids`` id, up to the stop string after a ``stop`` string (vLLM's texts;
    the ids keep the stop token either way). Before ``min_tokens`` new tokens nothing ends it."""
    out = seq.output
    p = seq.params
    n = len(out.token_ids)
    if n < p.min_tokens:
        return False
    if tok in seq.stop_eos:
        out.finish_reason, out.stop_reason = "stop", None
        out.text = detokenize(tokenizer, seq)
        return True
    if tok in p.stop_token_ids:
        out.finish_reason, out.stop_reason = "stop", tok
        out.text = detokenize(tokenizer, seq, end=-1)
        return True
    if p.stop and tokenizer is not None:
        searched = seq.stop_searched
        if searched is None:  # the first search: what the earlier tokens decoded to was never searched
            searched = 0 if n == 1 else len(tokenizer.decode(
                out.token_ids[:-1], skip_special_tokens=p.skip_special_tokens).rstrip("\ufffd"))
        text = detokenize(tokenizer, seq)
        # a trailing U+FFFD is an incomplete character that the next token may complete: searched again
        seq.stop_searched = len(text.rstrip("\ufffd"))
        hits = [(at, s) for s in p.stop if (at := text.find(s, max(0, searched - len(s) + 1))) >= 0]
        if hits:
            at, s = min(hits)
            out.text = text[:at]
            out.finish_reason, out.stop_reason = "stop", s
            return True
    return False
