"""Constrained decoding: grammars compiled off the engine loop, one matcher per sequence, one bitmask per step.

    SamplingParams.structured_outputs ─► StructuredOutputManager.add_request (engine thread: parse, ValueError)
        ─► compile on the grammar thread pool (cache keyed by the spec) ─► the request's sequences are held
        ─► compiled: sequences enter the scheduler, each with its GrammarMatcher
    each step: matchers of sequences that sample ─► GrammarBitmask (host, one preallocated buffer)
        ─► SchedulerOutput.grammar_bitmask ─► worker: SamplingMetadata.grammar_bitmask ─► Sampler masks the logits
    after the step: matchers accept the sampled tokens

xgrammar is imported only when the first request with a grammar arrives (backend.py).
"""

from pagedllm.structured_output.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager"]
