"""load_config: config files and --key=value overrides -> one frozen, type-checked dataclass.

    cfg = load_config(TrainConfig, ["configs/tiny.py", "configs/ablate/no_pose.py", "--lr=3e-4"])

Each config file holds plain `key = value` lines (comments allowed); files apply in order, then the CLI overrides.
Values are parsed with ast.literal_eval (bare words fall back to strings) and must match the default's type (an int is
accepted where a float is expected). An unknown key is an error that names the nearest valid key. Unlike nanoGPT's
configurator nothing is exec'd into globals, so every script and test can call this.
"""
import ast
import dataclasses
import difflib
import os


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line meant for the user."""


def _coerce(key, value, default, where):
    want = type(default)
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise ConfigError(f"{where}: {key} must be {want.__name__} (default {default!r}), got {value!r}")
    return value


def _check_key(key, fields, where):
    if key not in fields:
        near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{where}: unknown config key {key!r}{hint}")


def _read_file(path):
    """Assignments of a config file, in order, as {key: value}; only literals are allowed on the right."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = ast.parse(data.decode("utf-8"), filename=path)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{node.lineno}: only `key = value` lines are allowed")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"{path}:{node.lineno}: {node.targets[0].id} must be a literal value") from None
    return out


def load_config(cls, argv):
    """Resolve `cls` (a frozen dataclass with defaults) from config file paths and --key=value args, in order."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    values = {}
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not eq:
                raise ConfigError(f"override {arg!r} must look like --key=value")
            _check_key(key, fields, "command line")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # bare word: a string
            if isinstance(getattr(defaults, key), float) and isinstance(value, str):
                try:
                    value = float(raw)  # nan, inf: numbers, so the range check names what is wrong with them
                except ValueError:
                    pass
            if isinstance(getattr(defaults, key), str):
                value = raw  # strings never need quotes on the command line
            values[key] = _coerce(key, value, getattr(defaults, key), "command line")
        else:
            for key, value in _read_file(arg).items():
                _check_key(key, fields, arg)
                values[key] = _coerce(key, value, getattr(defaults, key), arg)
    cfg = dataclasses.replace(defaults, **values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg
