"""Offline inference shaped like vLLM's `LLM`: generate() and chat() over a list of prompts."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from nanoflow.engine.engine import LLMEngine
from nanoflow.engine.request import CompletionOutput, RequestOutput
from nanoflow.engine_args import EngineArgs
from nanoflow.models.default_model import default_model_path
from nanoflow.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PromptType = str | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine.from_args(EngineArgs(model=model or default_model_path(), **kwargs))
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the engine's tensor-parallel worker processes (also done at interpreter exit)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion. A prompt that can never run (too long, empty) gets an
        output with `.error` set and finish_reason "error"; the others still run."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling_params")
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, p in zip(prompts, params, strict=True):
            rid = str(next(self._ids))
            order.append(rid)
            text, ids = _split_prompt(prompt)
            try:
                self.engine.add_request(rid, text, ids, p)
            except ValueError as e:
                log.warning("request %s rejected: %s", rid, e)
                results[rid] = RequestOutput(rid, text, list(ids or []), [CompletionOutput(0, "", [], "error")],
                                             True, error=str(e))
        self.engine.stats.reset()
        bar = tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm, unit="req")
        bar.update(len(results))
        n_tokens = 0
        while self.engine.has_unfinished_requests():
            for out in self.engine.step(finished_only=True):
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
                    n_tokens += sum(len(o.token_ids) for o in out.outputs)
                    bar.set_postfix(output_tokens=n_tokens)
        bar.close()
        return [results[rid] for rid in order]

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the checkpoint's chat template to each conversation, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer (the engine runs with skip_tokenizer_init): "
                             "use generate() with {'prompt_token_ids': [...]} prompts")
        if not tok.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate() with plain prompts")
        out = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return prompt.get("prompt"), list(prompt["prompt_token_ids"])
    if isinstance(prompt, dict) and "prompt" in prompt:
        return prompt["prompt"], None
    raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids' or 'prompt', got {prompt!r}")
