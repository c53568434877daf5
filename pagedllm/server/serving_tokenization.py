"""POST /tokenize and /detokenize (vLLM's): the server's own tokenizer and chat template, no generation.

/tokenize takes ``prompt`` (encoded as /v1/completions encodes it) or ``messages`` (rendered
as /v1/chat/completions renders them, tools included), so a client can count tokens exactly
as a generation request would.
"""

from __future__ import annotations

from pagedllm.engine.chat_utils import apply_chat_template
from pagedllm.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from pagedllm.server.serving_engine import OpenAIServing, bad_request


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.check_model(request.model)
        if self.tokenizer is None:
            raise bad_request("this server runs without a tokenizer (skip_tokenizer_init)")
        if request.prompt is not None:
            self.check_prompt_chars(len(request.prompt), "prompt")
            special = request.add_special_tokens is not False
            ids = await self.engine.run_in_tokenizer_thread(self.tokenizer.encode, request.prompt,
                                                            add_special_tokens=special)
        else:
            tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
            ids = await self.engine.run_in_tokenizer_thread(
                apply_chat_template, self.tokenizer, request.messages, request.add_generation_prompt, None,
                bool(request.add_special_tokens), tools=tools,
                continue_final_message=request.continue_final_message,
                template_kwargs=request.chat_template_kwargs)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        if self.tokenizer is None:
            raise bad_request("this server runs without a tokenizer (skip_tokenizer_init)")
        self.check_token_ids(request.tokens, "tokens")
        text = await self.engine.run_in_tokenizer_thread(self.tokenizer.decode, request.tokens)
        return DetokenizeResponse(prompt=text)
