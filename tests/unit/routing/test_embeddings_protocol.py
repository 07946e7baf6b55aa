"""/v1/embeddings request checks and response body (tandem.routing.embeddings): OpenAI's four
input shapes, 400s naming the field, base64 as float32 little-endian."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from tandem.routing.embeddings import MAX_INPUTS, EmbeddingInputError, parse_request, response_body
from tandem.v1 import common_pb2


def parse(**body):
    return parse_request(json.dumps({"model": "m", **body}).encode())


def test_four_input_shapes():
    assert [x.text for x in parse(input="a").inputs] == ["a"]
    assert [x.text for x in parse(input=["a", "b"]).inputs] == ["a", "b"]
    assert [list(x.token_ids.ids) for x in parse(input=[1, 2, 3]).inputs] == [[1, 2, 3]]
    req = parse(input=[[1, 2], "c"], dimensions=8, encoding_format="base64")
    assert [x.WhichOneof("input") for x in req.inputs] == ["token_ids", "text"]
    assert req.dimensions == 8 and req.encoding_format == "base64"


@pytest.mark.parametrize("body,param", [
    ({"input": []}, "input"), ({"input": [""]}, "input[0]"), ({"input": ""}, "input[0]"),
    ({"input": ["a", [1, -1]]}, "input[1]"), ({"input": ["a", []]}, "input[1]"),
    ({"input": ["a", [True]]}, "input[1]"), ({"input": [1.5]}, "input[0]"), ({"input": {"a": 1}}, "input"),
    ({"input": [[2**31]]}, "input[0]"), ({"input": ["x"] * (MAX_INPUTS + 1)}, "input"),
    ({"input": "a", "dimensions": 0}, "dimensions"), ({"input": "a", "dimensions": "8"}, "dimensions"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format"), ({"input": "a", "user": 3}, "user"),
    ({"input": "a", "model": ""}, "model"), ({}, "input"), ({"input": "a", "n": 2}, "n"),
])
def test_bad_input_names_the_field(body, param):
    with pytest.raises(EmbeddingInputError) as e:
        parse(**body)
    assert e.value.param == param


def test_response_body_float_and_base64():
    embs = [common_pb2.Embedding(values=[0.5, -1.25, 3.0], num_tokens=2)]
    body = response_body(embs, "m", 2, "float")
    assert body["data"][0]["embedding"] == [0.5, -1.25, 3.0] and body["usage"] == {"prompt_tokens": 2,
                                                                                     "total_tokens": 2}
    b64 = response_body(embs, "m", 2, "base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(b64), "<f4").tolist() == [0.5, -1.25, 3.0]
