"""After sampling: append tokens, detokenize incrementally, decide which sequences stop."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from nanoflow.engine.request import CompletionOutput, Logprob, Request, RequestOutput, Sequence

# Tokens of prompt context decoded beside new tokens, so tokenizers that drop a leading space
# when a piece is decoded alone (sentencepiece) still produce the right text.
_CONTEXT_TOKENS = 5


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def start(self, seq: Sequence) -> None:
        seq.prefix_offset = max(0, len(seq.prompt_token_ids) - _CONTEXT_TOKENS)
        seq.read_offset = len(seq.prompt_token_ids)

    def append(self, seq: Sequence, token: int, logprobs: dict[int, Logprob] | None) -> None:
        """Adds one sampled token to seq and finishes it if a stop condition holds."""
        seq.output_token_ids.append(token)
        if logprobs is not None:
            if self.tokenizer is not None:
                for tok, lp in logprobs.items():
                    lp.decoded_token = self.tokenizer.decode([tok])
            if seq.logprobs is None:
                seq.logprobs = []
            seq.logprobs.append(logprobs)
        p = seq.params
        n_out = len(seq.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
                return
            if token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
                return
        new_text = self._detokenize(seq)
        if new_text and p.stop_strings and n_out >= p.min_tokens:
            self._check_stop_strings(seq, len(new_text))
            if seq.finish_reason:
                return
        if n_out >= seq.max_tokens or len(seq.prompt_token_ids) + n_out >= self.max_model_len:
            seq.finish_reason = "length"

    def _detokenize(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        ids = seq.token_slice(seq.prefix_offset)
        skip = seq.params.skip_special_tokens
        before = self.tokenizer.decode(ids[: seq.read_offset - seq.prefix_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(ids, skip_special_tokens=skip)
        # A trailing U+FFFD means a multi-byte character is split across tokens: wait for the rest.
        if len(full) <= len(before) or full.endswith("\ufffd"):
            return ""
        new = full[len(before) :]
        seq.text += new
        seq.prefix_offset, seq.read_offset = seq.read_offset, seq.prefix_offset + len(ids)
        return new

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_len: int) -> None:
        for stop in seq.params.stop_strings:
            start = max(0, len(seq.text) - new_len - len(stop) + 1)
            idx = seq.text.find(stop, start)
            if idx != -1:
                seq.text = seq.text[:idx]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return

    @staticmethod
    def request_output(req: Request, error: str | None = None) -> RequestOutput:
        outs = []
        for s in req.seqs:
            text = s.text
            if not s.is_finished and s.params.stop_strings:
                # Hold back a tail that may still turn out to be the start of a stop string.
                hold = max(len(x) for x in s.params.stop_strings) - 1
                text = text[: max(0, len(text) - hold)]
            outs.append(CompletionOutput(s.index, text, list(s.output_token_ids), s.finish_reason, s.stop_reason,
                                         s.logprobs))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished, error)
