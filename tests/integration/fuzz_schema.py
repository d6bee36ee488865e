"""The server's own OpenAPI schema, narrowed so that fuzzing reaches H2O's door.

``vllm_xargs`` is an open map in vLLM's schema (any key, string/number/list values), so
a fuzzer would almost never send an ``h2o_*`` key. Here it lists every H2O request
setting (and one unknown ``h2o_`` key), each of any JSON type, valid values among them;
the same settings may also appear at the top level of the request (a
common mistake, refused with 400); ``model`` is one of the served names (the others end at the 404 of the model lookup);
``n`` and ``max_tokens`` are bounded so that each case stays short on two cores (the
server's ``--max-model-len`` bounds generation anyway; cases above it still test the 400).
"""

from __future__ import annotations

import copy

from h2o_vllm import settings

PATHS = ("/v1/completions", "/v1/chat/completions")
REQUEST_SCHEMAS = ("CompletionRequest", "ChatCompletionRequest")
# Values a well-meaning client sends, so that the fuzzer also gets past each field's parser.
VALID_VALUES = {
    "policy": ["h2o", "keynorm", "streaming", "none"],
    "budget": [0.2, "20%", 64, "128"],
    "sink": [0, 4],
    "recent": [32, None],
    "prompt_window": [0, 8],
    "score_norm": ["sum", "mean"],
    "score_reduce": ["sum", "max"],
    "prefill": ["whole", "chunked", "staged"],
    "working_set": [1, 2],
    "prefill_score": ["auto", "attention", "key_norm"],
}
ANY_JSON = [
    {"type": "string"},
    {"type": "integer"},
    {"type": "number"},
    {"type": "boolean"},
    {"type": "null"},
    {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "number"}]}},
    {"type": "object"},
]
UNKNOWN_KEY = "h2o_budgett"
TOP_LEVEL_KEYS = ("h2o_budget", "h2o_policy")


def h2o_xargs_schema(nullable: bool = True) -> dict:
    props = {f.request_key: {"anyOf": [{"enum": VALID_VALUES[f.name]}, *ANY_JSON]} for f in settings.FIELDS}
    props[UNKNOWN_KEY] = {"anyOf": ANY_JSON}
    xargs = {"type": "object", "properties": props, "additionalProperties": False}
    return {"anyOf": [xargs, {"type": "null"}]} if nullable else xargs


def narrowed(openapi: dict, served_names: list[str]) -> dict:
    """A copy of ``openapi`` with only :data:`PATHS`, H2O-aware ``vllm_xargs`` and bounded sizes."""
    schema = copy.deepcopy(openapi)
    schema["paths"] = {p: {"post": schema["paths"][p]["post"]} for p in PATHS}
    for name in REQUEST_SCHEMAS:
        props = schema["components"]["schemas"][name]["properties"]
        props["model"] = {"enum": served_names}
        props["vllm_xargs"] = h2o_xargs_schema(nullable=False)
        for key in TOP_LEVEL_KEYS:
            props[key] = {"anyOf": ANY_JSON}
        props["n"] = {"anyOf": [{"type": "integer", "minimum": -1, "maximum": 3}, {"type": "null"}]}
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                props[key] = {"anyOf": [{"type": "integer", "minimum": -2, "maximum": 600}, {"type": "null"}]}
        request = schema["components"]["schemas"][name]
        request["required"] = sorted({*request.get("required", []), "model", "vllm_xargs"})
    # A prompt (vLLM's schema lets it be null or empty, which ends at the first 400), of
    # text or token ids (ids beyond the vocabulary included); prompt embeddings need a flag.
    completion = schema["components"]["schemas"]["CompletionRequest"]
    completion["properties"].pop("prompt_embeds", None)
    completion["properties"]["prompt"] = {
        "anyOf": [
            {"type": "string", "minLength": 1, "maxLength": 400},
            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 64},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 2},
        ]
    }
    completion["required"] = sorted({*completion["required"], "prompt"})
    return schema
