_instruments = ("sqlalchemy >= 2.0, < 2.2",)

_supports_metrics = True
