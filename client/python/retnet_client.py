"""A small Python client for retnet-serve (grpcio, Debian's /usr/bin/python3).

The stubs (retnet/v1/retnet_pb2.py, retnet_pb2_grpc.py) are generated from proto/ by the build
into build/python; put that folder on sys.path (or PYTHONPATH) before importing this module.

    from retnet_client import Client
    with Client("localhost:50051") as c:
        for piece in c.generate("And God said", session="demo", max_new_tokens=40):
            print(piece.text, end="", flush=True)
"""

from __future__ import annotations

import dataclasses
import json
import queue
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import grpc

from retnet.v1 import retnet_pb2 as pb


@dataclasses.dataclass
class Piece:
    """One streamed token."""

    id: int
    text: str
    logprob: Optional[float] = None
    token_bytes: Optional[bytes] = None  # the exact bytes, when asked for with token_bytes=True


@dataclasses.dataclass
class Result:
    """A finished turn: all token ids, the text, and the server's final message."""

    tokens: List[int]
    text: str
    final: "pb.Final"


def _retry_options(retries: int):
    """Channel options that retry a call refused before anything was received (a replica loading
    or draining behind a gateway), with exponential backoff; 0 = none. UNAVAILABLE, and CANCELLED:
    gRPC core cancels calls that reach a server after its shutdown began, before a handler ran."""
    if retries <= 0:
        return [("grpc.enable_retries", 0)]
    policy = {"maxAttempts": min(retries + 1, 5), "initialBackoff": "0.1s", "maxBackoff": "2s",
              "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}
    config = {"methodConfig": [{"name": [{"service": "retnet.v1.RetNet"}], "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


class UnparsableResponseError(grpc.RpcError):
    """The server sent bytes that are not a valid response message (e.g. a proto3 string that is
    not UTF-8). Raised at once, with the call cancelled; code() is INTERNAL like grpcio's own."""

    def __init__(self, method: str, message_type: str, reason: str):
        super().__init__(f"{method}: the server sent a message that is not a valid {message_type}: {reason}")
        self._details = str(self.args[0])

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INTERNAL

    def details(self) -> str:
        return self._details


class _Unparsable:
    def __init__(self, message_type: str, reason: str):
        self.message_type, self.reason = message_type, reason


def _tolerant(message_class):
    """A response deserializer that returns _Unparsable instead of raising: grpcio answers a
    raising deserializer with INTERNAL but leaves the stream running on the server."""
    def parse(data: bytes):
        msg = message_class()
        try:
            msg.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError, or UnicodeDecodeError for strings
            return _Unparsable(message_class.DESCRIPTOR.full_name, str(e) or type(e).__name__)
        return msg
    return parse


class _Stub:
    """retnet.v1.RetNet's methods with tolerant response deserializers (see _tolerant)."""

    _KINDS = {(False, False): "unary_unary", (False, True): "unary_stream",
              (True, False): "stream_unary", (True, True): "stream_stream"}

    def __init__(self, channel: grpc.Channel):
        service = pb.DESCRIPTOR.services_by_name["RetNet"]
        for m in service.methods:
            kind = self._KINDS[(m.client_streaming, m.server_streaming)]
            request = getattr(pb, m.input_type.name)
            response = getattr(pb, m.output_type.name)
            setattr(self, m.name, getattr(channel, kind)(
                f"/{service.full_name}/{m.name}", request_serializer=request.SerializeToString,
                response_deserializer=_tolerant(response)))


def _checked(method: str, msg, call=None):
    """`msg`, or UnparsableResponseError (cancelling `call`) when it did not parse."""
    if isinstance(msg, _Unparsable):
        if call is not None:
            call.cancel()
        raise UnparsableResponseError(method, msg.message_type, msg.reason)
    return msg


class Client:
    """Thin, typed wrapper over the retnet.v1.RetNet stub."""

    def __init__(self, target: str, api_key: Optional[str] = None,
                 root_certificates: Optional[bytes] = None, timeout: float = 120.0, retries: int = 3):
        options = _retry_options(retries)
        if root_certificates is not None:
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = _Stub(self._channel)
        self._metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self._timeout = timeout
        self.last_final: Optional[pb.Final] = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _request(prompt, session: str, max_new_tokens: Optional[int], temperature: Optional[float],
                 seed: Optional[int],
                 stop: Sequence[str], ignore_eos: bool, logprobs: Optional[int],
                 logit_bias: Optional[Dict[int, float]] = None,
                 token_bytes: bool = False) -> "pb.GenerateRequest":
        req = pb.GenerateRequest(session_id=session, create_session=bool(session),
                                 return_token_bytes=token_bytes)
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.tokens.ids.extend(int(t) for t in prompt)
        # Unset = the server's default (temperature 1.0, --default-max-new-tokens), as with
        # retnet-client and any other client of the API.
        if temperature is not None:
            req.sampling.temperature = temperature
        if seed is not None:
            req.sampling.seed = seed
        if max_new_tokens is not None:
            req.stopping.max_new_tokens = max_new_tokens
        req.stopping.stop.extend(stop)
        req.stopping.ignore_eos = ignore_eos
        if logprobs is not None:
            req.logprobs = logprobs
        for tid, bias in (logit_bias or {}).items():
            req.sampling.logit_bias[int(tid)] = float(bias)
        return req

    def generate(self, prompt, session: str = "", max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None,
                 seed: Optional[int] = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                 logprobs: Optional[int] = None, logit_bias: Optional[Dict[int, float]] = None,
                 token_bytes: bool = False) -> Iterator[Piece]:
        """Streams the turn's tokens; the Final message is left in `last_final`.

        `prompt` is text or a sequence of token ids; an empty `session` makes a one-shot request
        that leaves no session behind (last_final.session_id is empty); a named session is
        continued, or created if missing. Text is
        always valid UTF-8 (an incomplete character is held back until it completes; ill-formed
        bytes become U+FFFD); `token_bytes=True` also gives each token's exact bytes.
        Raises grpc.RpcError with the server's status code and message; a message that cannot be
        parsed raises at once with INTERNAL (grpcio cancels the call).
        """
        req = self._request(prompt, session, max_new_tokens, temperature, seed, stop, ignore_eos, logprobs,
                            logit_bias, token_bytes)
        self.last_final = None
        call = self._stub.Generate(req, timeout=self._timeout, metadata=self._routed(session))
        try:
            for msg in call:
                yield from self._pieces(_checked("Generate", msg, call), token_bytes)
        finally:
            call.cancel()  # a no-op after the end; stops the server when the caller stops early
            # or a message could not be parsed (grpcio raises INTERNAL but leaves the call open)

    def _pieces(self, msg: "pb.GenerateResponse", token_bytes: bool) -> Iterator[Piece]:
        if msg.HasField("chunk"):
            for t in msg.chunk.tokens:
                yield Piece(t.id, t.text, t.logprob if t.HasField("logprob") else None,
                            bytes(t.token_bytes) if token_bytes else None)
        else:
            self.last_final = msg.final

    def chat(self, turns: Iterable["pb.GenerateRequest"], session: str = "") -> Iterator[List[Piece]]:
        """One Chat stream: sends each request of `turns` after the previous turn's Final and
        yields that turn's pieces (its Final is in `last_final` meanwhile). Build the requests
        with request(); `session` routes the stream through a gateway."""
        pending: "queue.Queue" = queue.Queue()

        def requests():
            while True:
                req = pending.get()
                if req is None:
                    return
                yield pb.ChatRequest(turn=req)

        call = self._stub.Chat(requests(), timeout=self._timeout, metadata=self._routed(session))
        try:
            for req in turns:
                pending.put(req)
                pieces: List[Piece] = []
                self.last_final = None
                for msg in call:
                    pieces.extend(self._pieces(_checked("Chat", msg, call), req.return_token_bytes))
                    if self.last_final is not None:
                        break
                if self.last_final is None:
                    raise RuntimeError("the Chat stream ended before the turn's Final message")
                yield pieces
        finally:
            pending.put(None)
            call.cancel()

    def request(self, prompt, session: str = "", max_new_tokens: Optional[int] = None,
                temperature: Optional[float] = None,
                seed: Optional[int] = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                logprobs: Optional[int] = None, logit_bias: Optional[Dict[int, float]] = None,
                token_bytes: bool = False) -> "pb.GenerateRequest":
        """The GenerateRequest that generate() would send (for chat())."""
        return self._request(prompt, session, max_new_tokens, temperature, seed, stop, ignore_eos, logprobs,
                             logit_bias, token_bytes)

    def tokenize(self, text: str, add_bos: bool = False) -> List[int]:
        return list(_checked("Tokenize", self._stub.Tokenize(
            pb.TokenizeRequest(text=text, add_bos=add_bos), timeout=self._timeout, metadata=self._metadata)).ids)

    def detokenize(self, ids: Sequence[int]) -> Tuple[str, bytes]:
        """The ids' text (valid UTF-8, U+FFFD for ill-formed bytes) and their exact bytes."""
        resp = _checked("Detokenize", self._stub.Detokenize(
            pb.DetokenizeRequest(ids=[int(i) for i in ids]), timeout=self._timeout, metadata=self._metadata))
        return resp.text, bytes(resp.raw)

    def complete(self, prompt, **kwargs) -> Result:
        """generate() collected into one Result."""
        pieces = list(self.generate(prompt, **kwargs))
        final = self.last_final
        return Result([p.id for p in pieces], "".join(p.text for p in pieces) + final.text, final)

    def _routed(self, session: str):
        """The call's metadata; `x-session-id` lets a gateway keep the session on its replica."""
        return self._metadata + ([("x-session-id", session)] if session else [])

    def session(self, session_id: str) -> "pb.Session":
        return _checked("GetSession", self._stub.GetSession(
            pb.GetSessionRequest(session_id=session_id), timeout=self._timeout, metadata=self._routed(session_id)))

    def list_sessions(self) -> List["pb.Session"]:
        return list(_checked("ListSessions", self._stub.ListSessions(
            pb.ListSessionsRequest(), timeout=self._timeout, metadata=self._metadata)).sessions)

    def fork_session(self, session_id: str, new_session_id: str = "") -> "pb.Session":
        """Copies a session (state, sampler, history); routed to the replica holding the source."""
        return _checked("ForkSession", self._stub.ForkSession(
            pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id),
            timeout=self._timeout, metadata=self._routed(session_id)))

    def delete_session(self, session_id: str) -> None:
        self._stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=self._timeout,
                                 metadata=self._routed(session_id))

    def model_info(self) -> "pb.ModelInfo":
        return _checked("GetModelInfo", self._stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self._timeout, metadata=self._metadata))
