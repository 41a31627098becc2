"""The wire protocol's request parsing (serve_apps.protocol): pure functions, no Ray."""

import json

import pytest
import torch

from serve_apps.protocol import SEED_MAX, AnswerOptions, Rejection, parse_json_object

CAP = 2048


def rejected(fn, *args) -> Rejection:
    with pytest.raises(Rejection) as info:
        fn(*args)
    return info.value


# ------------------------------------------------------------------------------------------ seed


@pytest.mark.parametrize("seed", [0, 1, 12345, SEED_MAX, str(SEED_MAX), float(2**52)])
def test_seed_in_range_is_accepted_and_seeds_torch(seed):
    opts = AnswerOptions.parse({"seed": seed}, CAP)
    assert opts.seed == int(seed) and isinstance(opts.seed, int)
    assert torch.Generator().manual_seed(opts.seed).initial_seed() == opts.seed  # what the engine does


@pytest.mark.parametrize("seed", [SEED_MAX + 1, 2**64, 2**64 - 1, 10**30, str(2**64), "9" * 400, float(2**63),
                                  1e300, "1e400", "inf", "-inf", "nan", float("inf"), float("nan"), -1, "-1",
                                  1.5, "abc", "", [1], {"a": 1}, True])
def test_seed_out_of_range_or_not_an_integer_is_bad_request(seed):
    e = rejected(AnswerOptions.parse, {"seed": seed}, CAP)
    assert (e.status, e.reason) == (400, "bad_request")
    assert e.message.startswith("seed must be")
    assert len(e.message) < 200  # a 400-digit number is not echoed in full


def test_seed_message_names_the_range():
    e = rejected(AnswerOptions.parse, {"seed": str(2**64)}, CAP)
    assert e.message == f"seed must be an integer from 0 to {2**63 - 1} (2**63 - 1), got '{2**64}'"
    assert "non-negative" in rejected(AnswerOptions.parse, {"seed": -5}, CAP).message


def test_seed_from_a_query_string_and_a_json_body():
    assert AnswerOptions.parse({"seed": "42"}, CAP).seed == 42  # query parameters are strings
    body = parse_json_object(b'{"text": "hi", "seed": 18446744073709551616}')
    assert rejected(AnswerOptions.parse, body, CAP).reason == "bad_request"
    assert AnswerOptions.parse({"seed": None}, CAP).seed is None


# ------------------------------------------------------------------------------------------ max_steps


@pytest.mark.parametrize("steps", [CAP + 1, 10**30, 10**400, "9" * 5000, 2**64, 1e300, 1e308, "1e400", "inf", "nan",
                                   "-inf", float("inf"), float("nan"), 0, -3, "0", 2.5, "x", [], True])
def test_bad_max_steps_is_bad_request(steps):
    e = rejected(AnswerOptions.parse, {"max_steps": steps}, CAP)
    assert (e.status, e.reason) == (400, "bad_request")
    assert e.message.startswith("max_steps must be") and len(e.message) < 200


def test_max_steps_in_range():
    assert AnswerOptions.parse({"max_steps": 1}, CAP).max_steps == 1
    assert AnswerOptions.parse({"max_steps": str(CAP)}, CAP).max_steps == CAP
    assert AnswerOptions.parse({"max_steps": 64.0}, CAP).max_steps == 64
    assert rejected(AnswerOptions.parse, {"max_steps": CAP + 1}, CAP).message == \
        f"max_steps must be at most {CAP}, got {CAP + 1}"
    assert AnswerOptions.parse({}, CAP) == AnswerOptions()


def test_json_body_with_non_finite_numbers_is_bad_request():
    for body in (b'{"text": "hi", "max_steps": 1e400}', b'{"text": "hi", "seed": NaN}',
                 b'{"text": "hi", "max_steps": Infinity}', b'{"text": "hi", "seed": -Infinity}'):
        assert rejected(AnswerOptions.parse, parse_json_object(body), CAP).reason == "bad_request"


# ------------------------------------------------------------------------------------------ JSON bodies


def test_parse_json_object_returns_the_object():
    assert parse_json_object(b'{"text": "hi", "seed": 3}') == {"text": "hi", "seed": 3}
    assert parse_json_object('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert parse_json_object('{"t": "h\u00e9"}'.encode()) == {"t": "h\u00e9"}
    assert parse_json_object('{"t": "x"}'.encode("utf-16")) == {"t": "x"}  # json.loads detects UTF-16/32
    nested = "[" * 200 + "]" * 200
    assert parse_json_object('{"deep": ' + nested + "}")["deep"] == json.loads(nested)


@pytest.mark.parametrize("body", [
    "[" * 100_000 + "]" * 100_000,
    '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"a": ' + '{"b": ' * 100_000 + "1" + "}" * 100_001,
])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_too_deep_json_is_malformed_json(body, as_bytes):
    e = rejected(parse_json_object, body.encode() if as_bytes else body)
    assert (e.status, e.reason) == (400, "malformed_json")
    assert e.message == "the body is not valid JSON: it is nested too deeply"
    assert e.body() == {"error": {"reason": "malformed_json", "message": e.message}}
    assert isinstance(e.__cause__, RecursionError)


@pytest.mark.parametrize("body, start", [
    (b'{"audio_b64": "abc"', "the body is not valid JSON: "),
    (b"", "the body is not valid JSON: "),
    (b"{this is not json", "the body is not valid JSON: "),
    ('{"n": ' + "9" * 5000 + "}", "the body is not valid JSON: "),  # over Python's int digit limit
    (b'{"t": "\xff\xfe\xfd"}', "the body is not valid UTF-8 JSON: "),
    (b"\xc3(", "the body is not valid UTF-8 JSON: "),
    (b'["x"]', "the body must be a JSON object, got list"),
    (b"null", "the body must be a JSON object, got NoneType"),
    (b'"text"', "the body must be a JSON object, got str"),
    (b"42", "the body must be a JSON object, got int"),
])
def test_malformed_json(body, start):
    e = rejected(parse_json_object, body)
    assert (e.status, e.reason) == (400, "malformed_json")
    assert e.message.startswith(start)


def test_parse_json_object_names_what_it_parses():
    e = rejected(parse_json_object, "[1, 2]", "a text frame")
    assert e.message == "a text frame must be a JSON object, got list"
    assert rejected(parse_json_object, "{", "a text frame").message.startswith("a text frame is not valid JSON")
