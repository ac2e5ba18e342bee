import pytest

from serve_app.http.request_body import InvalidBody, check_chat_roles, engine_body
from serve_app.policy.priority import Priority


def test_priority_becomes_vllm_integer_and_input_is_not_mutated():
    body = {"messages": [], "priority": "low"}
    out = engine_body(body, Priority.LOW)
    assert out["priority"] == 2 and body["priority"] == "low"


def test_thinking_flags_move_into_chat_template_kwargs():
    assert engine_body({"enable_thinking": False}, Priority.HIGH)["chat_template_kwargs"] == {"enable_thinking": False}
    out = engine_body({"return_reasoning": True}, Priority.HIGH)
    assert out["chat_template_kwargs"] == {"enable_thinking": True} and "return_reasoning" not in out
    explicit = engine_body({"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}, Priority.HIGH)
    assert explicit["chat_template_kwargs"] == {"enable_thinking": False}


def test_untouched_without_thinking_flags():
    assert "chat_template_kwargs" not in engine_body({"messages": []}, Priority.MEDIUM)


def test_chat_roles_outside_openais_set_are_refused_with_their_place():
    good = {"messages": [{"role": r, "content": "x"} for r in ("system", "developer", "user", "assistant", "tool")]}
    check_chat_roles(good)
    check_chat_roles({"messages": "not a list"})  # malformed: left to vLLM's own validation
    with pytest.raises(InvalidBody) as caught:
        check_chat_roles({"messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]})
    assert caught.value.param == "messages[1].role" and "'wizard'" in str(caught.value)


def test_a_role_that_is_not_a_string_is_refused_not_crashed_on():
    for role in (["user"], {"a": 1}, 3):
        with pytest.raises(InvalidBody):
            check_chat_roles({"messages": [{"role": role, "content": "x"}]})


def test_the_prompt_shape_of_any_body_is_computed_without_raising():
    from serve_app.http.request_body import prompt_shape

    odd = "\udcff"  # what a client's invalid UTF-8 in a JSON string decodes to
    chars, blocks, max_tokens = prompt_shape("chat", {"model": odd, "messages": [{"role": "user", "content": "Hi"}]})
    assert chars == len("<user>Hi") and blocks == () and max_tokens is None
    image = {"type": "image_url", "image_url": {"url": odd * 10}}
    chars, blocks, _ = prompt_shape("chat", {"messages": [{"role": "user", "content": [image, {"text": "x" * 600}]}]})
    assert chars > 4096 and len(blocks) >= 2, "an image counts as text of its size, and its URL's hash is hashed"
    assert prompt_shape("completions", {"prompt": [1, 2, 3], "max_tokens": 5}) == (5, (), 5)
    assert prompt_shape("completions", {"prompt": None, "max_tokens": "many"}) == (0, (), None)
