"""Tool calling, written once: the tools of the original's tool-use evaluation (scripts/eval_toolcall.py) and
agentic RL (trainer/train_agent.py) -- their schemas, mock implementations and argument checks --, the parser of
`<tool_call>` blocks, and ToolRunner, which executes a call in a child process and always returns an observation.

    python -c "from dataset.tools import ToolRunner; print(ToolRunner().run('calculate_math', {'expression': '256*37'}))"
    # {"result": "9472"}

  * TOOLS: the 8 tools in OpenAI function format (calculate_math, get_current_time, random_number, text_length,
    unit_converter, get_current_weather, get_exchange_rate, translate_text), with eval_toolcall's descriptions
    (train_agent's own copies of six of them are shorter and unused there: its rollouts take each sample's tools).
  * MOCK_RESULTS: their mock implementations, one function per tool taking the arguments dict. The six that
    train_agent mocks use its fixed tables (weather, time, exchange rates, translations, unit factors; unknown
    keys fall back to its defaults, e.g. 22°C, rate 1.0, factor 1, celsius->fahrenheit = x1.8 without +32);
    random_number and text_length are eval_toolcall's. eval_toolcall's own cruder mocks (the clock, a constant
    rate 7.15, every conversion x0.621371) are not kept: one deterministic set makes scores repeatable.
    calculate_math is a safe arithmetic evaluator (safe_eval), not the original's `eval`.
  * CHECK_ARGS / check_args: the original's argument checks (the required arguments present and non-empty).
  * parse_tool_calls(text): the JSON of each `<tool_call>...</tool_call>` block, unparsable blocks dropped, as the
    original. model/chat_format.py's OutputParser is the display parser (it skips `<think>` text and keeps only
    objects with a name); the RL reward counts every parsable block, wherever it is, so this is the original's.
  * validate_gt_in_text(text, gt): the original's check that expected values appear in an answer.
  * ToolRunner: see its docstring. It is a guard against a tool's accidents (a loop, a crash, a flood of output,
    a stray network call), not a security boundary: the child is an ordinary process of the same user, and
    hostile code (native code, `_socket`, subprocesses) can get around the network block.
Writes nothing except temporary working directories of the tool process (removed after each call).
"""
import ast
import json
import math
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref

from model.chat_format import END_TOOL_CALL, TOOL_CALL

MAX_OBSERVATION = 2048     # characters of a tool result the model sees (the original's cut)
OUTPUT_CAP = 64 * 1024     # characters the tool process may print or send back per call
DEFAULT_TIMEOUT = 2.0      # seconds of wall time per call

# ---- schemas (eval_toolcall.py's descriptions) ----
TOOLS = [
    {"type": "function", "function": {"name": "calculate_math", "description": "计算数学表达式的结果，支持加减乘除、幂运算、开方等", "parameters": {"type": "object", "properties": {"expression": {"type": "string", "description": "数学表达式，如123+456、2**10、sqrt(144)"}}, "required": ["expression"]}}},
    {"type": "function", "function": {"name": "get_current_time", "description": "获取当前日期和时间，支持指定时区", "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "description": "时区名称，如Asia/Shanghai、America/New_York", "default": "Asia/Shanghai"}}, "required": []}}},
    {"type": "function", "function": {"name": "random_number", "description": "生成指定范围内的随机数", "parameters": {"type": "object", "properties": {"min": {"type": "integer", "description": "最小值", "default": 0}, "max": {"type": "integer", "description": "最大值", "default": 100}}, "required": []}}},
    {"type": "function", "function": {"name": "text_length", "description": "计算文本的字符数和单词数", "parameters": {"type": "object", "properties": {"text": {"type": "string", "description": "要统计的文本"}}, "required": ["text"]}}},
    {"type": "function", "function": {"name": "unit_converter", "description": "进行单位换算，支持长度、重量、温度等", "parameters": {"type": "object", "properties": {"value": {"type": "number", "description": "要转换的数值"}, "from_unit": {"type": "string", "description": "源单位，如km、miles、kg、pounds、celsius、fahrenheit"}, "to_unit": {"type": "string", "description": "目标单位"}}, "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {"name": "get_current_weather", "description": "获取指定城市的当前天气信息，包括温度、湿度和天气状况", "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "城市名称，如北京、上海、New York"}, "unit": {"type": "string", "description": "温度单位，celsius或fahrenheit", "enum": ["celsius", "fahrenheit"], "default": "celsius"}}, "required": ["location"]}}},
    {"type": "function", "function": {"name": "get_exchange_rate", "description": "查询两种货币之间的实时汇率", "parameters": {"type": "object", "properties": {"from_currency": {"type": "string", "description": "源货币代码，如USD、CNY、EUR"}, "to_currency": {"type": "string", "description": "目标货币代码，如USD、CNY、EUR"}}, "required": ["from_currency", "to_currency"]}}},
    {"type": "function", "function": {"name": "translate_text", "description": "将文本翻译成目标语言", "parameters": {"type": "object", "properties": {"text": {"type": "string", "description": "要翻译的文本"}, "target_language": {"type": "string", "description": "目标语言，如english、chinese、japanese、french"}}, "required": ["text", "target_language"]}}},
]
TOOL_MAP = {t["function"]["name"]: t for t in TOOLS}


def get_tools(names) -> list:
    """The schemas of the tools named (KeyError for an unknown name)."""
    return [TOOL_MAP[n] for n in names]


# ---- mock data (train_agent.py's tables) ----
WEATHER_DATA = {"北京": ("28°C", "晴"), "上海": ("15°C", "多云"), "广州": ("32°C", "闷热"), "深圳": ("30°C", "晴"), "杭州": ("22°C", "阴"), "成都": ("18°C", "小雨"), "武汉": ("25°C", "多云"), "南京": ("20°C", "晴"), "西安": ("16°C", "大风"), "重庆": ("26°C", "阴"), "Tokyo": ("12°C", "晴"), "New York": ("8°C", "多云"), "London": ("5°C", "小雨"), "Paris": ("10°C", "阴"), "Sydney": ("25°C", "晴朗")}
TIME_DATA = {"Asia/Shanghai": "2025-03-07 14:30:00", "America/New_York": "2025-03-07 01:30:00", "Europe/London": "2025-03-07 06:30:00", "Asia/Tokyo": "2025-03-07 15:30:00", "Europe/Paris": "2025-03-07 07:30:00", "Australia/Sydney": "2025-03-07 17:30:00"}
EXCHANGE_DATA = {("USD", "CNY"): 7.21, ("EUR", "CNY"): 7.85, ("GBP", "CNY"): 9.12, ("JPY", "CNY"): 0.048, ("USD", "EUR"): 0.92, ("USD", "GBP"): 0.79, ("CNY", "JPY"): 20.83, ("AUD", "CNY"): 4.72}
TRANSLATE_DATA = {("你好世界", "english"): "Hello World", ("Good morning", "chinese"): "早上好", ("今天天气真好", "english"): "The weather is nice today", ("I love programming", "chinese"): "我喜欢编程", ("机器学习很有趣", "english"): "Machine learning is interesting", ("Happy birthday", "chinese"): "生日快乐"}
UNIT_DATA = {"km_miles": 0.621371, "miles_km": 1.60934, "kg_pounds": 2.20462, "pounds_kg": 0.453592, "meters_feet": 3.28084, "feet_meters": 0.3048, "celsius_fahrenheit": 1.8, "fahrenheit_celsius": 0.5556}


# ---- safe arithmetic (calculate_math) ----
# what an expression may call or name: math's functions and constants (bare, or as math.<name> like the original's
# `math` global) and a few harmless builtins; factorial is bounded below
MATH_NAMES = {name: getattr(math, name) for name in (
    "sqrt", "cbrt", "exp", "log", "log2", "log10", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh",
    "tanh", "degrees", "radians", "floor", "ceil", "trunc", "fabs", "hypot", "pow", "gcd", "isqrt", "factorial",
    "pi", "e", "tau") if hasattr(math, name)}
MATH_NAMES.update(abs=abs, round=round, min=min, max=max)
MAX_EXPRESSION = 1000      # characters
MAX_INT_BITS = 10_000      # about 3,000 digits: any bigger intermediate integer is an error
MAX_FACTORIAL = 1000
MAX_ROUND_DIGITS = 400
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
# the original's replacements of typed symbols (train_agent's, plus eval_toolcall's superscripts)
_SYMBOLS = {"^": "**", "×": "*", "÷": "/", "−": "-", "²": "**2", "³": "**3", "（": "(", "）": ")"}


def safe_eval(expression: str):
    """The value (int or float) of an arithmetic expression: numbers, + - * / // % **, unary + and -, parentheses
    and the MATH_NAMES functions/constants (bare or as math.<name>). Anything else (other names, attributes,
    strings, comprehensions, lambdas), an integer over MAX_INT_BITS bits or a factorial over MAX_FACTORIAL is a
    ValueError; Python's own errors (ZeroDivisionError, OverflowError) pass through."""
    text = str(expression)
    for symbol, python in _SYMBOLS.items():
        text = text.replace(symbol, python)
    if len(text) > MAX_EXPRESSION:
        raise ValueError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, MemoryError, RecursionError) as err:
        raise ValueError(f"not an arithmetic expression: {getattr(err, 'msg', err)}") from None
    try:
        return _value(tree.body)
    except RecursionError:
        raise ValueError("expression nested too deeply") from None


def _checked(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"result larger than {MAX_INT_BITS} bits")
    return value


def _value(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _power(_value(node.left), _value(node.right))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _checked(_BINARY[type(node.op)](_value(node.left), _value(node.right)))
    if isinstance(node, (ast.Name, ast.Attribute)):
        value = MATH_NAMES[_math_name(node)]
        if callable(value):
            raise ValueError(f"{_math_name(node)} is a function: call it")
        return value
    if isinstance(node, ast.Call) and not node.keywords and isinstance(node.func, (ast.Name, ast.Attribute)):
        name = _math_name(node.func)
        fn, args = MATH_NAMES[name], [_value(a) for a in node.args]
        if not callable(fn):
            raise ValueError(f"{name} is not a function")
        if name == "factorial" and args and isinstance(args[0], int) and args[0] > MAX_FACTORIAL:
            raise ValueError(f"factorial of more than {MAX_FACTORIAL}")
        if name == "round" and len(args) > 1 and isinstance(args[1], int) and abs(args[1]) > MAX_ROUND_DIGITS:
            raise ValueError(f"round to more than {MAX_ROUND_DIGITS} digits")   # round(7, -10**7) computes 10**10**7
        if name == "pow" and len(args) == 2:
            return float(_power(float(args[0]), args[1]))
        return _checked(fn(*args))
    raise ValueError(f"not allowed in an arithmetic expression: {type(node).__name__}")


def _math_name(node) -> str:
    """The MATH_NAMES entry a Name (`sqrt`) or an Attribute of math (`math.sqrt`) refers to; else ValueError."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math":
        name = node.attr
    elif isinstance(node, ast.Name):
        name = node.id
    else:
        raise ValueError("only math.<name> attributes are allowed")
    if name not in MATH_NAMES:
        raise ValueError(f"unknown name {name!r} (math functions and constants only)")
    return name


def _power(base, exponent):
    """base ** exponent, refusing integer results over MAX_INT_BITS before computing them."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * (abs(base).bit_length() - 1) > MAX_INT_BITS:
            raise ValueError(f"result larger than {MAX_INT_BITS} bits")
    return _checked(base ** exponent)


# ---- mock implementations: each takes the arguments dict and returns a JSON-serialisable result ----
def calculate_math(args: dict) -> dict:
    return {"result": str(safe_eval(args.get("expression", "0")))}


def unit_converter(args: dict) -> dict:
    factor = UNIT_DATA.get(f"{str(args.get('from_unit', '')).lower()}_{str(args.get('to_unit', '')).lower()}", 1)
    return {"result": round(float(args.get("value", 0)) * factor, 4)}


def get_current_weather(args: dict) -> dict:
    temperature, condition = WEATHER_DATA.get(args.get("location"), ("22°C", "晴"))
    return {"city": args.get("location"), "temperature": temperature, "humidity": "65%", "condition": condition}


def get_current_time(args: dict) -> dict:
    timezone = args.get("timezone", "Asia/Shanghai")
    return {"datetime": TIME_DATA.get(timezone, "2025-03-07 14:30:00"), "timezone": timezone}


def get_exchange_rate(args: dict) -> dict:
    pair = (args.get("from_currency"), args.get("to_currency"))
    return {"from": pair[0], "to": pair[1], "rate": EXCHANGE_DATA.get(pair, 1.0)}


def translate_text(args: dict) -> dict:
    return {"translated_text": TRANSLATE_DATA.get((args.get("text"), args.get("target_language")), args.get("text", ""))}


def random_number(args: dict) -> dict:
    """A random integer in [min, max], drawn from a generator seeded by the call's arguments (and `seed`, if
    given), so a run that offers this tool can be repeated and resumed exactly (the original's is unseeded)."""
    low, high = int(args.get("min", 0)), int(args.get("max", 100))
    rng = random.Random(json.dumps(args, sort_keys=True, ensure_ascii=False, default=str))
    return {"result": rng.randint(low, high)}


def text_length(args: dict) -> dict:
    text = args.get("text", "")
    return {"characters": len(text), "words": len(text.split())}


MOCK_RESULTS = {fn.__name__: fn for fn in (calculate_math, get_current_time, random_number, text_length,
                                           unit_converter, get_current_weather, get_exchange_rate, translate_text)}

# ---- argument checks (train_agent.py's CHECK_ARGS; random_number and text_length by their schemas) ----
CHECK_ARGS = {
    "calculate_math": lambda a: bool(a.get("expression")),
    "unit_converter": lambda a: a.get("value") is not None and bool(a.get("from_unit")) and bool(a.get("to_unit")),
    "get_current_weather": lambda a: bool(a.get("location")),
    "get_current_time": lambda a: True,
    "get_exchange_rate": lambda a: bool(a.get("from_currency")) and bool(a.get("to_currency")),
    "translate_text": lambda a: bool(a.get("text")) and bool(a.get("target_language")),
    "random_number": lambda a: True,
    "text_length": lambda a: bool(a.get("text")),
}


def check_args(name: str, args) -> bool:
    """Do `args` (a parsed arguments object) pass tool `name`'s check? False for an unknown tool or a non-object."""
    check = CHECK_ARGS.get(name)
    return bool(check and isinstance(args, dict) and check(args))


# ---- parsing model output ----
_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL) + r"(.*?)" + re.escape(END_TOOL_CALL), re.DOTALL)


def parse_tool_calls(text: str) -> list:
    """The JSON value of every `<tool_call>...</tool_call>` block of `text` (anywhere, `<think>` included), in
    order; blocks that are not JSON are dropped (the original's parse_tool_calls). A value need not be an object:
    call_parts reads one."""
    calls = []
    for block in _TOOL_CALL_RE.findall(text):
        try:
            calls.append(json.loads(block.strip()))
        except (ValueError, RecursionError):
            pass
    return calls


def call_parts(call) -> tuple:
    """(name, raw arguments) of a parsed call: {"name", "arguments"} (arguments an object or a JSON string), or
    an OpenAI tool call {"function": {...}}; anything else gives ("", {})."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not isinstance(call, dict):
        return "", {}
    name = call.get("name", "")
    return (name if isinstance(name, str) else ""), call.get("arguments", {})


def parse_arguments(raw):
    """A call's arguments as a dict: an object as it is, a JSON string decoded (None or "" = no arguments); None
    when they are not a JSON object."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    return raw if isinstance(raw, dict) else None


def validate_gt_in_text(text, gt_list) -> set:
    """The expected values of `gt_list` found in `text`: case-insensitively as a substring, or, for a number, as
    any number of the comma-stripped text within 1e-6 (the original's validate_gt_in_text)."""
    text = str(text)
    numbers = [float(x) for x in re.findall(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])", text.replace(",", ""))]
    found = set()
    for gt in gt_list:
        s = str(gt).strip()
        if s and s.lower() in text.lower():
            found.add(gt)
        elif re.fullmatch(r"[-+]?\d+(?:\.\d+)?", s.replace(",", "")):
            if any(abs(float(s.replace(",", "")) - n) < 1e-6 for n in numbers):
                found.add(gt)
    return found


def error_observation(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def is_error(observation: str) -> bool:
    """Is this observation an error (a JSON object with an "error" key)?"""
    try:
        value = json.loads(observation)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and "error" in value


# ---- the runner ----
def tool_spec(tool) -> str:
    """"module:function" of a tool: a module-level function (importable by the child process), or such a string."""
    if isinstance(tool, str):
        if ":" not in tool:
            raise ValueError(f"tool {tool!r}: expected 'module:function'")
        return tool
    module, qualname = getattr(tool, "__module__", None), getattr(tool, "__qualname__", "")
    if not callable(tool) or not module or module == "__main__" or "." in qualname or "<" in qualname:
        raise ValueError(f"tool {tool!r}: must be a module-level function of an importable module")
    return f"{module}:{qualname}"


class ToolRunner:
    """Executes tool calls in one child Python process and always returns an observation string: the tool's
    result as JSON (ensure_ascii=False) cut to `max_chars`, or `{"error": ...}`. Never raises for a bad call.

        runner = ToolRunner()                          # the 8 mock tools; ToolRunner(tools={...}) for others
        runner.register("my_tool", my_module.my_tool)  # a module-level function taking the arguments dict
        runner.run("calculate_math", '{"expression": "1+1"}')   # '{"result": "2"}'
        runner.close()                                 # or `with ToolRunner() as runner:`

    Errors, each one observation and the runner keeps working: an unknown tool or one not in `allowed`;
    arguments that are not a JSON object, or fail the tool's CHECK_ARGS entry; a tool that raises (its type and
    message), exits, prints more than `output_cap` characters, or returns something json.dumps refuses; a call
    over `timeout` seconds of wall time (the process is killed and a new one started for the next call).
    In the child: each call runs in a fresh temporary working directory, sys.stdout/stderr are a capped buffer
    (file descriptors 1 and 2 go to /dev/null), the reply is cut to `output_cap` characters, sockets cannot be
    created (socket.socket and its helpers raise OSError), and on POSIX the address space is limited to
    `memory_mb` MiB, written files to 64 MiB and CPU time to a margin over `timeout` per call (so a looping
    child that outlives its parent still ends). Not a security boundary (see the module docstring).

    Cost: starting the child takes about 50 ms (once, and after each timeout); a call then costs a pipe round
    trip and a temporary directory, well under a millisecond. Calls are serialised (a lock): the tools are
    mocks that answer at once, so one process keeps up with an RL rollout's calls.
    """

    def __init__(self, tools: dict = None, timeout: float = DEFAULT_TIMEOUT, max_chars: int = MAX_OBSERVATION,
                 output_cap: int = OUTPUT_CAP, memory_mb: int = 4096, start_timeout: float = 60.0):
        self.tools = {}
        for name, tool in (MOCK_RESULTS if tools is None else tools).items():
            self.register(name, tool)
        self.timeout, self.max_chars, self.output_cap, self.memory_mb = timeout, max_chars, output_cap, memory_mb
        self.start_timeout = start_timeout
        self.starts = 0            # child processes started so far
        self._proc = self._replies = self._finalizer = None
        self._lock = threading.Lock()

    def register(self, name: str, tool) -> None:
        """Add or replace tool `name`: a module-level function (or "module:function") taking the arguments dict."""
        self.tools[name] = tool_spec(tool)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, name: str, arguments=None, allowed=None) -> str:
        """The observation of calling tool `name` with `arguments` (a dict or a JSON string); `allowed`: the tool
        names offered in this conversation (None = every registered tool)."""
        if name not in self.tools or (allowed is not None and name not in allowed):
            return error_observation(f"tool not found: {name}"[:self.max_chars])
        args = parse_arguments(arguments)
        if args is None:
            return error_observation("arguments are not a JSON object")
        if name in CHECK_ARGS and self.tools[name] == tool_spec(MOCK_RESULTS[name]) and not check_args(name, args):
            required = TOOL_MAP[name]["function"]["parameters"]["required"]
            return error_observation(f"invalid arguments for {name}: needs non-empty {', '.join(required)}")
        try:
            request = json.dumps({"tool": self.tools[name], "args": args}, ensure_ascii=False) + "\n"
        except (TypeError, ValueError):
            return error_observation("arguments are not JSON-serialisable")
        with self._lock:
            text = self._call(name, request)
        return text[:self.max_chars]

    def run_call(self, call, allowed=None) -> str:
        """run() of a parsed call (see call_parts)."""
        name, raw = call_parts(call)
        return self.run(name, raw, allowed)

    def close(self) -> None:
        with self._lock:
            self._stop()

    # -- the child process --
    def _call(self, name: str, request: str) -> str:
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            failure = self._start()
            if failure:
                return error_observation(failure)
        try:
            self._proc.stdin.write(request.encode("utf-8"))
            self._proc.stdin.flush()
            line = self._replies.get(timeout=self.timeout)
        except (OSError, ValueError):
            line = None
        except queue.Empty:
            self._stop()
            return error_observation(f"tool {name} timed out after {self.timeout:g} s")
        reply = _decode(line)
        if reply is None:
            self._stop()
            return error_observation(f"tool {name} ended its process")
        return reply["result"] if reply.get("ok") else error_observation(str(reply.get("error")))

    def _start(self):
        """Start the child and wait for its ready line; an error message, or None."""
        home = tempfile.mkdtemp(prefix="minimind_tools_")
        paths = [os.path.abspath(p or os.curdir) for p in sys.path]
        boot = "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); from dataset.tools import _worker; _worker()"
        settings = json.dumps({"cap": self.output_cap, "memory_mb": self.memory_mb, "timeout": self.timeout})
        self._proc = subprocess.Popen([sys.executable, "-c", boot, json.dumps(paths), settings], cwd=home,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      start_new_session=os.name == "posix")
        # ends the child on close(), a restart, or when the runner is garbage-collected or the program exits
        self._finalizer = weakref.finalize(self, _end_child, self._proc, home)
        self.starts += 1
        self._replies = queue.Queue()
        # a reply line is at most output_cap characters of result, JSON-escaped (6 bytes per char at worst)
        limit = 6 * self.output_cap + 4096
        threading.Thread(target=_read_lines, args=(self._proc.stdout, self._replies, limit), daemon=True).start()
        try:
            ready = _decode(self._replies.get(timeout=self.start_timeout))
        except queue.Empty:
            ready = None
        if not (ready and ready.get("ready")):
            self._stop()
            return "the tool process did not start"
        return None

    def _stop(self):
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._finalizer = None


def _end_child(proc, home: str):
    """Kill the child (and, on POSIX, the processes it started) and remove its working directories."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, 9)   # the child leads its own session
        else:
            proc.kill()
    except OSError:
        pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass
    shutil.rmtree(home, ignore_errors=True)


def _read_lines(stream, replies: queue.Queue, limit: int):
    """Reader thread: the child's reply lines (each at most `limit` bytes) into `replies`; None at the end."""
    try:
        while True:
            line = stream.readline(limit)
            if not line:
                break
            replies.put(line)
    except (OSError, ValueError):
        pass
    replies.put(None)


def _decode(line):
    """A reply line as a dict; None for the end of the stream or a line that is cut or not a JSON object."""
    if not line or not line.endswith(b"\n"):
        return None
    try:
        reply = json.loads(line)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


# ---- inside the child process ----
class _OutputLimit(BaseException):
    """Raised by the capped stdout; a BaseException so that a tool's `except Exception` does not swallow it."""


class _CappedOutput:
    """sys.stdout / sys.stderr of a call: keeps nothing, and raises _OutputLimit past `cap` characters."""

    def __init__(self, cap: int):
        self.cap, self.written, self.exceeded = cap, 0, False
        self.encoding, self.errors = "utf-8", "replace"

    def write(self, text) -> int:
        self.written += len(text)
        if self.written > self.cap:
            self.exceeded = True
            raise _OutputLimit()
        return len(text)

    def flush(self):
        pass

    def isatty(self) -> bool:
        return False


def _limit_resources(memory_mb: int):
    """POSIX: cap the address space and the size of written files (a write past it fails instead of killing)."""
    try:
        import resource
        import signal
    except ImportError:
        return
    limits = [(resource.RLIMIT_FSIZE, 64 * 2 ** 20), (resource.RLIMIT_CORE, 0)]   # no core file on SIGXCPU
    if memory_mb:
        limits.append((resource.RLIMIT_AS, memory_mb * 2 ** 20))
    for kind, value in limits:
        try:
            hard = resource.getrlimit(kind)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(kind, (value, hard))
        except (ValueError, OSError):
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _cpu_guard(seconds: float):
    """POSIX: end the process (SIGXCPU) once this call used `seconds` of CPU time: the parent kills a call at its
    wall-time limit, and this ends a looping child even when the parent is gone."""
    try:
        import resource
        used = resource.getrusage(resource.RUSAGE_SELF)
        limit = int(used.ru_utime + used.ru_stime + seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (limit, resource.getrlimit(resource.RLIMIT_CPU)[1]))
    except (ImportError, ValueError, OSError):
        pass


def _block_network():
    """Make socket creation and name lookups raise OSError for the tools (best effort: `_socket` stays)."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled for tools")

    class NoSocket(socket.socket):   # a subclass, so modules that subclass socket.socket still import
        def __init__(self, *args, **kwargs):
            refuse()

    socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(socket, name):
            setattr(socket, name, refuse)


def _worker():
    """The child's main loop: one JSON request line in ({"tool": "module:function", "args": {...}}), one reply
    line out ({"ok": true, "result": json text} or {"ok": false, "error": message})."""
    settings = json.loads(sys.argv[2])
    cap = settings["cap"]
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")   # replies; fd 1 and 2 then go nowhere
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    _limit_resources(settings["memory_mb"])
    _block_network()
    home, functions = os.getcwd(), {}
    channel.write('{"ready": true}\n')
    channel.flush()
    for line in sys.stdin:
        _cpu_guard(2 * settings["timeout"] + 1)
        reply = _run_one(json.loads(line), functions, cap, home)
        channel.write(json.dumps(reply, ensure_ascii=False) + "\n")
        channel.flush()


def _run_one(request: dict, functions: dict, cap: int, home: str) -> dict:
    workdir = tempfile.mkdtemp(dir=home)
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = output = _CappedOutput(cap)
    try:
        os.chdir(workdir)
        spec = request["tool"]
        if spec not in functions:
            import importlib
            module, _, name = spec.partition(":")
            functions[spec] = getattr(importlib.import_module(module), name)
        result = functions[spec](request["args"])
        if output.exceeded:
            raise _OutputLimit()
        try:
            text = json.dumps(result, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as err:
            return {"ok": False, "error": f"the tool's result is not JSON-serialisable: {str(err)[:200]}"}
        return {"ok": True, "result": text[:cap]}
    except _OutputLimit:
        return {"ok": False, "error": f"the tool printed more than {cap} characters"}
    except BaseException as err:   # SystemExit and KeyboardInterrupt from a tool are its errors too
        return {"ok": False, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    finally:
        sys.stdout, sys.stderr = saved
        os.chdir(home)
        shutil.rmtree(workdir, ignore_errors=True)
