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
from typing import Iterator, List, Optional, Sequence

import grpc

from retnet.v1 import retnet_pb2 as pb
from retnet.v1 import retnet_pb2_grpc as pb_grpc


@dataclasses.dataclass
class Piece:
    """One streamed token."""

    id: int
    text: str
    logprob: Optional[float] = None


@dataclasses.dataclass
class Result:
    """A finished turn: all token ids, the text, and the server's final message."""

    tokens: List[int]
    text: str
    final: "pb.Final"


def _retry_options(retries: int):
    """Channel options that retry a call refused with UNAVAILABLE before anything was received
    (a replica loading or draining behind a gateway), with exponential backoff; 0 = none."""
    if retries <= 0:
        return [("grpc.enable_retries", 0)]
    policy = {"maxAttempts": min(retries + 1, 5), "initialBackoff": "0.1s", "maxBackoff": "2s",
              "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    config = {"methodConfig": [{"name": [{"service": "retnet.v1.RetNet"}], "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


class Client:
    """Thin, typed wrapper over the retnet.v1.RetNet stub."""

    def __init__(self, target: str, api_key: Optional[str] = None,
                 root_certificates: Optional[bytes] = None, timeout: float = 120.0, retries: int = 3):
        options = _retry_options(retries)
        if root_certificates is not None:
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = pb_grpc.RetNetStub(self._channel)
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
    def _request(prompt, session: str, max_new_tokens: int, temperature: float, seed: Optional[int],
                 stop: Sequence[str], ignore_eos: bool, logprobs: Optional[int]) -> "pb.GenerateRequest":
        req = pb.GenerateRequest(session_id=session, create_session=bool(session))
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.tokens.ids.extend(int(t) for t in prompt)
        req.sampling.temperature = temperature
        if seed is not None:
            req.sampling.seed = seed
        req.stopping.max_new_tokens = max_new_tokens
        req.stopping.stop.extend(stop)
        req.stopping.ignore_eos = ignore_eos
        if logprobs is not None:
            req.logprobs = logprobs
        return req

    def generate(self, prompt, session: str = "", max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: Optional[int] = None, stop: Sequence[str] = (), ignore_eos: bool = False,
                 logprobs: Optional[int] = None) -> Iterator[Piece]:
        """Streams the turn's tokens; the Final message is left in `last_final`.

        `prompt` is text or a sequence of token ids; an empty `session` creates a new one (its id
        is in last_final.session_id); a named session is continued, or created if missing.
        Raises grpc.RpcError with the server's status code and message.
        """
        req = self._request(prompt, session, max_new_tokens, temperature, seed, stop, ignore_eos, logprobs)
        self.last_final = None
        for msg in self._stub.Generate(req, timeout=self._timeout, metadata=self._routed(session)):
            if msg.HasField("chunk"):
                for t in msg.chunk.tokens:
                    yield Piece(t.id, t.text, t.logprob if t.HasField("logprob") else None)
            else:
                self.last_final = msg.final

    def complete(self, prompt, **kwargs) -> Result:
        """generate() collected into one Result."""
        pieces = list(self.generate(prompt, **kwargs))
        final = self.last_final
        return Result([p.id for p in pieces], "".join(p.text for p in pieces) + final.text, final)

    def _routed(self, session: str):
        """The call's metadata; `x-session-id` lets a gateway keep the session on its replica."""
        return self._metadata + ([("x-session-id", session)] if session else [])

    def session(self, session_id: str) -> "pb.Session":
        return self._stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=self._timeout,
                                     metadata=self._routed(session_id))

    def list_sessions(self) -> List["pb.Session"]:
        return list(self._stub.ListSessions(pb.ListSessionsRequest(), timeout=self._timeout,
                                            metadata=self._metadata).sessions)

    def fork_session(self, session_id: str, new_session_id: str = "") -> "pb.Session":
        """Copies a session (state, sampler, history); routed to the replica holding the source."""
        return self._stub.ForkSession(pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id),
                                      timeout=self._timeout, metadata=self._routed(session_id))

    def delete_session(self, session_id: str) -> None:
        self._stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=self._timeout,
                                 metadata=self._routed(session_id))

    def model_info(self) -> "pb.ModelInfo":
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout, metadata=self._metadata)
