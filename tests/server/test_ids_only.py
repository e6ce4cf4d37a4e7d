"""An ids-only checkpoint (vocabulary 128, no tokenizer files) served end to end.

usage: test_ids_only.py --server build/bin/retnet-server --forward build/bin/retnet-forward
                        --stubs build/python

Checks (each fails if the feature it names is broken):
1. the server starts on it (no "too small for the byte-level tokenizer") and ModelInfo says the
   tokenizer is "none" with the checkpoint's vocabulary;
2. a token-id prompt streams ids (inside the vocabulary) with empty text, and the greedy ids equal
   the argmax of retnet-forward's parallel logits over the same sequence (the model, end to end);
3. a follow-up turn continues the session, and a one-shot request leaves no session;
4. a text prompt, stop strings, Tokenize and Detokenize are refused with FAILED_PRECONDITION
   naming the field and saying the model has no tokenizer; nothing is created by the refusals.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
from harness import FAILURES, ServerProcess, check  # noqa: E402

VOCAB = 128


def make_ids_only_checkpoint(out_dir):
    from bench_gpu import make_checkpoint  # noqa: E402  (torch is imported there)
    import torch
    make_checkpoint({"layers": 2, "d": 64, "heads": 2, "inter": 128, "vocab": VOCAB}, out_dir, seed=3,
                    dtype=torch.float32)
    path = os.path.join(out_dir, "config.json")
    config = json.load(open(path))
    config.pop("tokenizer", None)  # nothing says how to tokenize: ids only
    with open(path, "w") as fh:
        json.dump(config, fh, indent=2)


def forward_argmax(forward_bin, checkpoint, tokens, tmp):
    """retnet-forward's parallel logits over `tokens`: the argmax at every position."""
    import torch
    from safetensors_io import load_file, save_file
    inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
    save_file({"tokens": torch.tensor([tokens], dtype=torch.int64)}, inp)
    subprocess.run([forward_bin, "--checkpoint", checkpoint, "--input", inp, "--output", out,
                    "--mode", "parallel"], check=True, stdout=subprocess.DEVNULL)
    return load_file(out)["logits"][0].argmax(-1).tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--forward", required=True)
    ap.add_argument("--stubs", required=True)
    args = ap.parse_args()
    sys.path.insert(0, args.stubs)
    import grpc
    from retnet.v1 import retnet_pb2 as pb
    from retnet.v1 import retnet_pb2_grpc as pb_grpc

    tmp = tempfile.mkdtemp(prefix="retnet-ids-only-")
    server = None
    try:
        ckpt = os.path.join(tmp, "ckpt")
        make_ids_only_checkpoint(ckpt)
        server = ServerProcess(args.server, tmp, "ids", "--checkpoint", ckpt, log=os.path.join(tmp, "server.log"))
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.RetNetStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        check(info.tokenizer == "none" and info.vocab_size == VOCAB,
              f"1. ModelInfo: tokenizer none, vocabulary {VOCAB} ({info.tokenizer!r}, {info.vocab_size})")

        def generate(session, ids, n, create=True):
            req = pb.GenerateRequest(session_id=session, create_session=create)
            req.tokens.ids.extend(ids)
            req.sampling.temperature = 0
            req.stopping.max_new_tokens = n
            req.stopping.ignore_eos = True
            got, texts, final = [], [], None
            for msg in stub.Generate(req, timeout=60):
                if msg.HasField("chunk"):
                    got += [t.id for t in msg.chunk.tokens]
                    texts += [t.text for t in msg.chunk.tokens]
                else:
                    final = msg.final
            return got, texts, final

        prompt = [5, 17, 99, 3, 64, 120, 7]
        got, texts, final = generate("ids", prompt, 12)
        check(len(got) == 12 and all(0 <= t < VOCAB for t in got) and all(t == "" for t in texts)
              and final is not None and final.text == "",
              f"2. token-id prompt: 12 ids in the vocabulary, empty text ({got}, {texts[:3]})")
        want = forward_argmax(args.forward, ckpt, prompt + got[:-1], tmp)[len(prompt) - 1:]
        check(got == want, f"2. greedy ids equal retnet-forward's argmax ({got} vs {want})")
        more, _, final2 = generate("ids", [9], 5)
        check(len(more) == 5 and final2.usage.session_tokens_total == len(prompt) + 12 + 1 + 5,
              f"3. a follow-up turn continues the session ({final2.usage.session_tokens_total})")
        one, _, final3 = generate("", prompt, 12, create=False)
        check(one == got and final3.session_id == "", "3. a one-shot request gives the same ids")
        listed = [s.session_id for s in stub.ListSessions(pb.ListSessionsRequest(), timeout=60).sessions]
        check(listed == ["ids"], f"3. the one-shot request left no session ({listed})")

        def refused(call, field):
            try:
                call()
                return False
            except grpc.RpcError as e:
                return (e.code() == grpc.StatusCode.FAILED_PRECONDITION and field in e.details()
                        and "no tokenizer" in e.details())

        text_req = pb.GenerateRequest(session_id="t", create_session=True, text="hello")
        check(refused(lambda: list(stub.Generate(text_req, timeout=60)), "text"),
              "4. a text prompt: FAILED_PRECONDITION naming text")
        stop_req = pb.GenerateRequest(session_id="t", create_session=True)
        stop_req.tokens.ids.extend([1, 2])
        stop_req.stopping.stop.append("x")
        check(refused(lambda: list(stub.Generate(stop_req, timeout=60)), "stopping.stop"),
              "4. stop strings: FAILED_PRECONDITION naming stopping.stop")
        check(refused(lambda: stub.Tokenize(pb.TokenizeRequest(text="a"), timeout=60), "Tokenize"),
              "4. Tokenize: FAILED_PRECONDITION")
        check(refused(lambda: stub.Detokenize(pb.DetokenizeRequest(ids=[1, 2]), timeout=60), "Detokenize"),
              "4. Detokenize: FAILED_PRECONDITION")
        listed = [s.session_id for s in stub.ListSessions(pb.ListSessionsRequest(), timeout=60).sessions]
        check(listed == ["ids"], f"4. the refusals created nothing ({listed})")
        channel.close()
        check(server.stop() == 0, "the server drains and exits 0")
        server = None
    finally:
        if server is not None:
            server.kill()
        if FAILURES and os.path.exists(os.path.join(tmp, "server.log")):
            print("--- server log ---\n" + open(os.path.join(tmp, "server.log")).read()[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(FAILURES)} failure(s)" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
