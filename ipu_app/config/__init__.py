"""Run configuration: YAML files in the paper's vocabulary, ``base:`` inheritance, typed overrides.

``schema`` holds the sections and ``RunConfig``, ``loading`` reads YAML (inheritance, ``--set``
overrides, type coercion), ``short_run`` rescales what ``--steps`` changes, ``checks`` is
``RunConfig.validate``. Every problem is a ``ConfigError`` with one line.
"""

from .loading import (CONFIG_DIR, config_names, differing_key, from_dict, load_config, load_raw, parse_override,
                      parse_yaml, read_yaml, rename_old_keys, resolve_config_path)
from .schema import SECTION_CLASSES, ConfigError, FinetuneSettings, RunConfig
from .short_run import MIN_SHORT_RUN_WARMUP, SHORT_RUN_EVENTS, short_run_segments, short_run_warmup

__all__ = ["CONFIG_DIR", "MIN_SHORT_RUN_WARMUP", "SECTION_CLASSES", "SHORT_RUN_EVENTS", "ConfigError",
           "FinetuneSettings", "RunConfig", "config_names", "differing_key", "from_dict",
           "load_config", "load_raw", "parse_override", "parse_yaml", "read_yaml", "rename_old_keys",
           "resolve_config_path", "short_run_segments", "short_run_warmup"]
