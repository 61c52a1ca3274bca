"""The gateway's API surface beyond chat: ``/v1/models/{id}``, ``/v1/responses`` with sticky
routing, ``/v1/messages`` (Anthropic's shape and key header), and the engines' other model
endpoints (``/tokenize`` at the engine's root, the audio form), with the real ``openai`` and
``anthropic`` clients where a client has a call for it.

The engines are ``bench.fakeengine`` (it stands for vLLM's Responses API, which keeps each
response in the replica that made it, and for the endpoints llama-server does not serve
here: rerank, score, audio); tests/test_client_apis.py runs the same clients against the
real llama-server. Two fakes are two replicas of one model: what sticky routing is for.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from fake_upstream import FakeUpstream, Knobs
from test_gateway_proxy import JOB_KEY, add_record, assert_openai_error, gateway

from gateway.keys import create_key
from gateway.proxy.apis import APIS
from gateway.proxy.form import boundary_of, read_form
from gateway.responses import Home, ResponseHomes, response_id
from hpc.openai import error_body
from hpc.registry import Registry

pytestmark = pytest.mark.timeout(60)

HI = [{"role": "user", "content": "hi"}]


def _anthropic(url: str, **auth: str) -> Any:
    return anthropic.AsyncAnthropic(base_url=url, max_retries=0, **auth)


def _assert_anthropic_error(body: dict[str, Any], type_: str) -> None:
    assert set(body) == {"type", "error"}, body
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == type_
    assert body["error"]["message"]


async def test_models_retrieve_finds_a_listed_name_and_404s_another(tmp_path: Path) -> None:
    add_record(tmp_path / "registry", "m", "http://127.0.0.1:9/v1")
    add_record(tmp_path / "registry", "org/model-7b", "http://127.0.0.1:9/v1")
    async with gateway(tmp_path) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        async with client:
            listed = {m.id for m in (await client.models.list()).data}
            assert listed == {"m", "org/model-7b"}
            for name in listed:
                model = await client.models.retrieve(name)
                assert (model.id, model.object, model.owned_by) == (name, "model", "modeltainer")
            with pytest.raises(openai.NotFoundError) as raised:
                await client.models.retrieve("nope")
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "model_not_found"


async def test_responses_streaming_and_not_with_the_openai_client(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    client_key = create_key(keys, "alice")
    async with FakeUpstream(Knobs(require_key=JOB_KEY)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, keys_file=keys) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=client_key, max_retries=0)
            async with client:
                reply = await client.responses.create(model="m", input="hi")
                assert reply.output_text == "tok0 tok1 tok2 "
                stream = await client.responses.create(model="m", input="hi", stream=True)
                kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 3
    assert fake.seen.paths == ["/v1/responses", "/v1/responses"]
    # The engine got the job's key, whatever the client sent.
    assert fake.seen.authorization == [f"Bearer {JOB_KEY}"] * 2


async def test_a_follow_up_goes_to_the_replica_that_holds_the_response(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    alice, bob = create_key(keys, "alice"), create_key(keys, "bob")
    async with FakeUpstream() as one, FakeUpstream() as two:
        add_record(tmp_path / "registry", "m", one.base_url)
        add_record(tmp_path / "registry", "m", two.base_url)
        async with gateway(tmp_path, keys_file=keys) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=alice, max_retries=0)
            async with client:
                firsts = [(await client.responses.create(model="m", input="hi")).id]
                stream = await client.responses.create(model="m", input="hi", stream=True)
                firsts += [e.response.id async for e in stream if e.type == "response.created"]
                firsts += [(await client.responses.create(model="m", input="hi")).id]
                # Round robin spread them; each follow-up (4 each) reaches the replica
                # that holds its response: the other one answers 404.
                for first in firsts:
                    previous = first
                    for turn in range(4):
                        stream_it = turn % 2 == 1
                        reply = await client.responses.create(
                            model="m", input="more", previous_response_id=previous,
                            stream=stream_it,
                        )  # fmt: skip
                        previous = await _id_of(reply) if stream_it else reply.id
                        assert previous.split("_")[1] == first.split("_")[1]  # its port
            other = openai.AsyncOpenAI(base_url=url + "/v1", api_key=bob, max_retries=0)
            async with other:
                with pytest.raises(openai.BadRequestError) as raised:
                    await other.responses.create(
                        model="m", input="mine now", previous_response_id=firsts[0]
                    )
    assert {f.split("_")[1] for f in firsts} == {str(one.port), str(two.port)}
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "previous_response_not_found"
    assert "not made with this key" in raised.value.body["message"]
    assert one.seen.requests + two.seen.requests == 3 + 12  # bob's never left the gateway


async def test_a_follow_up_whose_replica_is_gone_is_refused(tmp_path: Path) -> None:
    async with FakeUpstream() as one, FakeUpstream() as two:
        registry = tmp_path / "registry"
        first = add_record(registry, "m", one.base_url)
        add_record(registry, "m", two.base_url)
        async with gateway(tmp_path, reload_interval_s=0.2) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            async with client:
                made = [(await client.responses.create(model="m", input="hi")).id for _ in "ab"]
                held = next(m for m in made if m.split("_")[1] == str(one.port))
                Registry(registry).write(first.model_copy(update={"state": "gone"}))
                await _until_replicas(url, "m", 1)
                with pytest.raises(openai.BadRequestError) as raised:
                    await client.responses.create(
                        model="m", input="more", previous_response_id=held
                    )
                # An id the gateway never saw is routed like any request (the engine says).
                with pytest.raises(openai.NotFoundError):
                    await client.responses.create(
                        model="m", input="more", previous_response_id="resp_unknown"
                    )
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "previous_response_not_found"
    assert "no longer serves" in raised.value.body["message"]


async def _id_of(stream: Any) -> str:
    """The id of a streamed response: its ``response.created`` event's."""
    ids = [e.response.id async for e in stream if e.type == "response.created"]
    return str(ids[0])


async def _until_replicas(url: str, model: str, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.get(url + "/healthz") as response:
                replicas = (await response.json())["replicas"]
            if replicas.get(model, {}).get("total") == count:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway still routes {replicas}")


def test_the_response_homes_forget_the_least_recently_used() -> None:
    homes = ResponseHomes(limit=2)
    homes.remember("a", Home("job-1", None))
    homes.remember("b", Home("job-2", None))
    assert homes.find("a") == Home("job-1", None)  # now the most recent
    homes.remember("c", Home("job-1", "alice"))
    assert (homes.find("a"), homes.find("b"), homes.find("c")) == (
        Home("job-1", None),
        None,
        Home("job-1", "alice"),
    )
    homes.remember("x" * 201, Home("job-1", None))  # no engine's id: not kept
    assert len(homes) == 2
    assert response_id(b'{"id": "resp_1"}', stream=False) == "resp_1"
    first = b'event: response.created\ndata: {"response": {"id": "resp_2"}}\n\n'
    assert response_id(first, stream=True) == "resp_2"
    assert response_id(b": comment\n\n", stream=True) is None
    assert response_id(b"[1]", stream=False) is None


@pytest.mark.parametrize("auth", ["api_key", "auth_token"])
async def test_messages_with_the_anthropic_client_either_key_header(
    tmp_path: Path, auth: str
) -> None:
    keys = tmp_path / "keys.yaml"
    client_key = create_key(keys, "alice")
    async with FakeUpstream(Knobs(require_key=JOB_KEY)) as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with (
            gateway(tmp_path, keys_file=keys) as url,
            _anthropic(url, **{auth: client_key}) as client,
        ):
            reply = await client.messages.create(model="m", max_tokens=8, messages=HI)
            assert reply.content[0].text == "tok0 tok1 tok2 "
            assert reply.usage.output_tokens == 3
            async with client.messages.stream(model="m", max_tokens=8, messages=HI) as s:
                text = "".join([t async for t in s.text_stream])
            assert text == "tok0 tok1 tok2 "
            counted = await client.messages.count_tokens(model="m", messages=HI)
            assert counted.input_tokens == 1
            # Claude Code sends ?beta=true (this SDK version only with extra_query).
            beta = await client.beta.messages.create(
                model="m", max_tokens=8, messages=HI, extra_query={"beta": "true"}
            )
            assert beta.content[0].text == "tok0 tok1 tok2 "
    assert fake.seen.paths == [
        "/v1/messages",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/messages?beta=true",
    ]
    for headers in fake.seen.headers:
        # The job's key as Bearer, never the client's key in any header.
        assert headers["Authorization"] == f"Bearer {JOB_KEY}"
        assert "x-api-key" not in {name.lower() for name in headers}
        assert client_key not in json.dumps(headers)
        assert headers["anthropic-version"]  # the client's, passed on


async def test_messages_errors_are_in_anthropics_shape(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    client_key = create_key(keys, "alice", models=("m",))
    any_model = create_key(keys, "bob")
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        add_record(tmp_path / "registry", "secret", fake.base_url)
        async with gateway(tmp_path, keys_file=keys) as url:
            async with _anthropic(url, api_key="mt-wrong") as wrong:
                with pytest.raises(anthropic.AuthenticationError) as refused:
                    await wrong.messages.create(model="m", max_tokens=8, messages=HI)
            async with _anthropic(url, auth_token=any_model) as client:
                with pytest.raises(anthropic.NotFoundError) as unknown:
                    await client.messages.create(model="nope", max_tokens=8, messages=HI)
            async with _anthropic(url, api_key=client_key) as client:
                with pytest.raises(anthropic.PermissionDeniedError) as denied:
                    await client.messages.create(model="secret", max_tokens=8, messages=HI)
            async with aiohttp.ClientSession(headers={"x-api-key": client_key}) as session:
                async with session.post(url + "/v1/messages", data=b"{") as response:
                    bad_json = (response.status, await response.json())
                async with session.get(url + "/v1/messages") as response:
                    wrong_method = (response.status, await response.json())
                # The OpenAI paths keep OpenAI's shape, and take x-api-key too.
                async with session.post(url + "/v1/chat/completions", json={"x": 1}) as response:
                    openai_shaped = (response.status, await response.json())
    _assert_anthropic_error(refused.value.body, "authentication_error")
    _assert_anthropic_error(unknown.value.body, "not_found_error")
    _assert_anthropic_error(denied.value.body, "permission_error")
    assert bad_json[0] == 400
    _assert_anthropic_error(bad_json[1], "invalid_request_error")
    assert wrong_method[0] == 405
    _assert_anthropic_error(wrong_method[1], "invalid_request_error")
    assert openai_shaped[0] == 400
    assert_openai_error(openai_shaped[1], "missing_model")
    assert fake.seen.requests == 0


async def test_a_messages_stream_cut_short_ends_with_an_anthropic_error_event(
    tmp_path: Path,
) -> None:
    async with (
        FakeUpstream(Knobs(tokens=4, cut_after=2)) as cut,
        FakeUpstream(Knobs(omit_done=True)) as unfinished,
    ):
        add_record(tmp_path / "registry", "cut", cut.base_url)
        add_record(tmp_path / "registry", "unfinished", unfinished.base_url)
        async with gateway(tmp_path) as url:
            async with _anthropic(url, api_key="none") as client:
                with pytest.raises(anthropic.APIStatusError, match="broke off") as broke:
                    async with client.messages.stream(
                        model="cut", max_tokens=8, messages=HI
                    ) as stream:
                        async for _ in stream.text_stream:
                            pass
            body = {"model": "unfinished", "max_tokens": 8, "messages": HI, "stream": True}
            async with (
                aiohttp.ClientSession() as session,
                session.post(url + "/v1/messages", json=body) as response,
            ):
                raw = await response.read()
    assert broke.value.body is not None
    events = raw.decode().strip().split("\n\n")
    assert events[-2].startswith("event: content_block_delta")
    name, data = events[-1].split("\n")
    assert name == "event: error"
    error = json.loads(data.removeprefix("data: "))
    _assert_anthropic_error(error, "api_error")
    assert "without message_stop" in error["error"]["message"]


async def test_engine_endpoints_are_routed_by_model_at_the_engines_paths(
    tmp_path: Path,
) -> None:
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path) as url, aiohttp.ClientSession() as session:
            answers = []
            for path in ("/tokenize", "/detokenize", "/v1/rerank", "/v1/score"):
                async with session.post(url + path, json={"model": "m", "x": 1}) as response:
                    answers.append((response.status, await response.json()))
            async with session.post(url + "/tokenize", json={"content": "hi"}) as response:
                no_model = (response.status, await response.json())
    assert answers == [
        (200, {"path": path, "model": "m", "form": None})
        for path in ("/tokenize", "/detokenize", "/v1/rerank", "/v1/score")
    ]
    # llama-server's and vLLM's /tokenize are at the engine's root, not under /v1.
    assert fake.seen.paths == ["/tokenize", "/detokenize", "/v1/rerank", "/v1/score"]
    assert no_model[0] == 400
    assert_openai_error(no_model[1], "missing_model")


async def test_an_audio_form_is_routed_by_its_model_field_and_renamed_for_an_alias(
    tmp_path: Path,
) -> None:
    async with FakeUpstream() as fake:
        models = tmp_path / "models.yaml"
        models.write_text(f"static:\n  - name: whisper\n    base_url: {fake.base_url}\n"
                          "    aliases: [stt]\n")  # fmt: skip
        async with gateway(tmp_path, models_file=models) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            async with client:
                raw = await client.audio.transcriptions.with_raw_response.create(
                    model="stt", file=("hi.wav", b"RIFF\x00\x01\r\n--fake", "audio/wav")
                )
                answer = json.loads(raw.content)
                served = raw.headers["x-mt-served-model"]
            async with aiohttp.ClientSession() as session:
                form = aiohttp.FormData()
                form.add_field("file", b"\x00" * 10, filename="a.wav")
                async with session.post(url + "/v1/audio/transcriptions", data=form) as response:
                    no_model = (response.status, await response.json())
                async with session.post(
                    url + "/v1/audio/transcriptions", json={"model": "stt"}
                ) as response:
                    not_a_form = (response.status, await response.json())
    assert answer == {"path": "/v1/audio/transcriptions", "model": "whisper",
                      "form": ["file", "model"]}  # fmt: skip
    assert served == "whisper"
    assert fake.seen.headers[0]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert no_model[0] == 400
    assert_openai_error(no_model[1], "missing_model")
    assert not_a_form[0] == 400
    assert_openai_error(not_a_form[1], "invalid_body")


def test_the_form_reader_finds_the_model_wherever_it_is() -> None:
    boundary = boundary_of('multipart/form-data; boundary="b o"')
    assert boundary == b"b o"
    body = (
        b'--b o\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        b'name="model"\r\n--b \r\n--b o\r\n'
        b'Content-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n'
        b'--b o\r\nContent-Disposition: form-data; name="model"\r\n\r\nm-1\r\n--b o--\r\n'
    )
    form = read_form(body, boundary)
    assert form is not None
    assert (form.model, form.stream) == ("m-1", True)
    renamed = form.renamed(body, "other")
    again = read_form(renamed, boundary)
    assert again is not None and again.model == "other"
    assert renamed.replace(b"other", b"m-1") == body
    nameless = body.replace(b'name="model"\r\n\r\n', b'name="mode"\r\n\r\n')
    assert read_form(nameless, boundary) is None
    assert boundary_of("application/json") is None
    assert boundary_of("multipart/form-data") is None


async def test_x_api_key_counts_only_without_a_bearer_token(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    client_key = create_key(keys, "alice")
    body = {"model": "m", "messages": HI}
    statuses = []
    async with FakeUpstream() as fake:
        add_record(tmp_path / "registry", "m", fake.base_url)
        async with gateway(tmp_path, keys_file=keys) as url, aiohttp.ClientSession() as session:
            for headers in (
                {"x-api-key": client_key},
                {"Authorization": f"Bearer {client_key}", "x-api-key": "mt-wrong"},
                {"Authorization": "Bearer mt-wrong", "x-api-key": client_key},
                {"Authorization": f"Basic {client_key}"},
            ):
                async with session.post(
                    url + "/v1/chat/completions", json=body, headers=headers
                ) as response:
                    statuses.append(response.status)
    assert statuses == [200, 200, 401, 401]
    assert "x-api-key" not in {name.lower() for name in fake.seen.headers[0]}


def test_an_open_stream_ends_with_an_error_in_its_apis_shape() -> None:
    by_path = {api.path: api for api in APIS}
    body = error_body("no replica answered", "server_error", "upstream_unavailable")
    assert by_path["/v1/chat/completions"].end_event(body) == b"data: " + body + b"\n\n"
    assert by_path["/v1/responses"].end_event(body) == b"data: " + body + b"\n\n"
    name, data = by_path["/v1/messages"].end_event(body).decode().strip().split("\n")
    assert name == "event: error"
    error = json.loads(data.removeprefix("data: "))
    _assert_anthropic_error(error, "overloaded_error")  # a 503 before the 200
    assert error["error"]["message"] == "no replica answered"
    cut = by_path["/v1/messages"].error_event("broke off", "upstream_idle_timeout")
    _assert_anthropic_error(json.loads(cut.split(b"data: ", 1)[1]), "api_error")
