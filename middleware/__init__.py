"""The gateway's middlewares: one module each, config schema beside its handler (DESIGN §1, §6)."""

from .auth import AuthMode, AuthPolicy, JwtAuthMiddleware, JwtSettings, claim_header_names, claim_headers
from .cache import CacheConfig
from .jwks import KeySource
from .problem import Problem, ProblemMiddleware
from .rate_limit import RateLimitConfig
from .request_id import RequestIdMiddleware
from .schema import ConfigError, Section

__all__ = (
    "AuthMode",
    "AuthPolicy",
    "CacheConfig",
    "ConfigError",
    "JwtAuthMiddleware",
    "JwtSettings",
    "KeySource",
    "Problem",
    "ProblemMiddleware",
    "RateLimitConfig",
    "RequestIdMiddleware",
    "Section",
    "claim_header_names",
    "claim_headers",
)
