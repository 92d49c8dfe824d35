"""Misbehaving tools for tests/test_tools.py: module-level functions, so ToolRunner's child process can import them
by name (tests.tool_helpers:<function>). Each takes the arguments dict, as every tool does."""
import os
import sys


def echo(args):
    return {"args": args, "cwd": os.getcwd()}


def write_file(args):
    """Writes a file in the working directory and reports what else was there (a fresh directory: nothing)."""
    before = sorted(os.listdir("."))
    with open("scratch.txt", "w") as f:
        f.write("x")
    return {"before": before, "cwd": os.getcwd()}


def raises(args):
    raise RuntimeError("boom")


def loops(args):
    while True:
        pass


def prints_10mb(args):
    chunk = "x" * 1024
    for _ in range(10 * 1024):
        print(chunk)
    return {"done": True}


def writes_10mb_to_fd(args):
    """Bypasses sys.stdout: straight to file descriptor 1 (which goes to /dev/null in the child)."""
    for _ in range(10):
        os.write(1, b"y" * 2 ** 20)
    return {"done": True}


def swallows_print_limit(args):
    """Catches Exception around its printing: the output limit still ends the call as an error."""
    try:
        print("z" * 10 ** 6)
    except Exception:
        pass
    return {"done": True}


def huge_result(args):
    return {"text": "w" * 10 ** 7}


def not_serialisable(args):
    return {"value": object()}


def opens_socket(args):
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("127.0.0.1", 9))
    return {"connected": True}


def fetches_url(args):
    import urllib.request
    return {"body": urllib.request.urlopen("http://127.0.0.1:9/", timeout=1).read().decode()}


def exits(args):
    sys.exit(3)


def kills_itself(args):
    os._exit(1)
