"""The pool doctor: read figures over a window, judge them (pure), report.

Typical use from code (the scenario suite does this)::

    from sqlalchemy_pool_tools.doctor import diagnose, from_metrics_endpoint
    for fig in from_metrics_endpoint("http://127.0.0.1:9464/metrics", duration_s=10).values():
        print(diagnose(fig).verdict)
"""

from sqlalchemy_pool_tools.doctor.figures import (
    Figures,
    from_metrics_endpoint,
    from_prometheus,
    histogram_quantile,
    parse_window,
)
from sqlalchemy_pool_tools.doctor.report import exit_code, render_json, render_text, to_dict
from sqlalchemy_pool_tools.doctor.verdict import Diagnosis, Finding, diagnose, review_config

__all__ = [
    "Diagnosis",
    "Figures",
    "Finding",
    "diagnose",
    "exit_code",
    "from_metrics_endpoint",
    "from_prometheus",
    "histogram_quantile",
    "parse_window",
    "render_json",
    "render_text",
    "review_config",
    "to_dict",
]
