"""Sampling parameters, their one validation, and the output text rules (detokenization,
stop strings) that the engine and the router share. Torch-free and proto-free."""
from .params import (
                     SamplingError,
                     SamplingParams,
                     StructuredOutput,
                     check_continuation,
                     check_fits_context,
                     check_prompt,
                     rest_of_context,
)
from .text import IncrementalDetokenizer, StopStrings

__all__ = ["SamplingParams", "StructuredOutput", "SamplingError", "check_prompt", "check_fits_context", "check_continuation",
           "rest_of_context", "IncrementalDetokenizer", "StopStrings"]
