"""The gateway's middlewares: one module each, config schema beside its handler (DESIGN §1, §6)."""

from .auth import AuthMode, AuthPolicy, JwtAuthMiddleware, JwtSettings, claim_header_names, claim_headers
from .cache import CacheConfig, CacheMiddleware, purge
from .jwks import KeySource
from .problem import Problem, ProblemMiddleware
from .rate_limit import RateLimitConfig, RateLimitMiddleware
from .request_id import RequestIdMiddleware
from .schema import ConfigError, Section

__all__ = (
    "AuthMode",
    "AuthPolicy",
    "CacheConfig",
    "CacheMiddleware",
    "ConfigError",
    "JwtAuthMiddleware",
    "JwtSettings",
    "KeySource",
    "Problem",
    "ProblemMiddleware",
    "RateLimitConfig",
    "RateLimitMiddleware",
    "RequestIdMiddleware",
    "Section",
    "claim_header_names",
    "claim_headers",
    "purge",
)
