package main

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// config is every setting the service reads from its environment. Each
// field's default is in loadConfig; SPEC.md and .env.example list them too.
type config struct {
	Addr  string
	Store string // "memory" or "redis"

	RedisAddr     string // host:port
	RedisDB       int
	RedisPassword string
	RedisUsername string
	RedisTimeout  time.Duration
	RedisPipeline bool     // the request path's commands share connections (pipeline.go)
	RedisCluster  []string // REDIS_CLUSTER: host:port of some of the cluster's nodes

	RateLimit           int
	RateWindow          time.Duration
	AuthTokens          []string // AUTH_TOKENS: when set, writes need one
	AuthReads           bool     // reads need one too
	TokenRateLimit      int      // writes per window of each valid token
	RateLimitFailClosed bool
	TrustedProxies      []netip.Prefix
	// LimiterTimeout is all the time the limiter may add to a request when
	// its store hangs; past it the request fails open (or closed). It is
	// not read from the environment: REDIS_TIMEOUT bounds the write itself.
	LimiterTimeout time.Duration

	CacheTTL        time.Duration
	CacheMaxEntries int

	BreakerThreshold    int
	BreakerResetTimeout time.Duration

	ExternalURL         string
	ExternalFailureRate float64
	ExternalLatency     time.Duration
	ExternalTimeout     time.Duration

	MaxBodyBytes int64
	MaxBatch     int
	MaxTypes     int
	MaxSeries    int
	MaxFuture    time.Duration
	Retention    retention

	MaxStreams  int
	CORSOrigins []string // "*" for any

	RedisPrefix string

	LogLevel slog.Level
}

// loadConfig reads and validates every variable in one pass. It reports all
// invalid variables at once, each by name, so a bad deployment is fixed in
// one round rather than one variable per restart.
func loadConfig(getenv func(string) string) (config, error) {
	p := envParser{getenv: getenv}
	c := config{
		Addr:  p.str("ADDR", ":8000"),
		Store: p.oneOf("STORE", "memory", "memory", "redis"),

		RedisTimeout:  p.duration("REDIS_TIMEOUT", "500ms"),
		RedisPipeline: p.boolean("REDIS_PIPELINE", "true"),

		RateLimit:           p.integer("RATE_LIMIT", "5", 1, math.MaxInt32),
		RateWindow:          p.duration("RATE_WINDOW", "60"),
		RateLimitFailClosed: p.boolean("RATE_LIMIT_FAIL_CLOSED", "false"),
		AuthTokens:          p.tokens("AUTH_TOKENS"),
		AuthReads:           p.boolean("AUTH_READS", "false"),
		TokenRateLimit:      p.integer("TOKEN_RATE_LIMIT", "1000", 1, math.MaxInt32),
		TrustedProxies:      p.prefixes("TRUSTED_PROXIES"),
		LimiterTimeout:      100 * time.Millisecond,

		CacheTTL:        p.duration("CACHE_TTL", "300"),
		CacheMaxEntries: p.integer("CACHE_MAX_ENTRIES", "10000", 1, 10_000_000),

		BreakerThreshold:    p.integer("CB_FAILURE_THRESHOLD", "3", 1, math.MaxInt32),
		BreakerResetTimeout: p.duration("CB_RESET_TIMEOUT", "10"),

		ExternalURL:         p.httpURL("EXTERNAL_URL"),
		ExternalFailureRate: p.probability("EXTERNAL_SERVICE_FAILURE_RATE", "0.2"),
		ExternalLatency:     p.durationOrZero("EXTERNAL_SERVICE_LATENCY", "50ms"),
		ExternalTimeout:     p.duration("EXTERNAL_TIMEOUT", "2s"),

		MaxBodyBytes: int64(p.integer("MAX_BODY_BYTES", "1048576", 1, math.MaxInt32)),
		MaxBatch:     p.integer("MAX_BATCH", "10000", 1, math.MaxInt32),
		MaxTypes:     p.integer("MAX_TYPES", "10000", 1, math.MaxInt32),
		MaxSeries:    p.integer("MAX_SERIES", "1000", 1, 1_000_000),
		MaxFuture:    p.durationOrZero("MAX_FUTURE", "1h"),
		Retention:    p.retention(),

		MaxStreams:  p.integer("MAX_STREAMS", "1000", 1, 1_000_000),
		CORSOrigins: p.origins("CORS_ORIGINS"),

		RedisPrefix: strings.TrimSpace(p.getenv("REDIS_PREFIX")),

		LogLevel: p.level("LOG_LEVEL", "info"),
	}
	c.RedisAddr, c.RedisDB, c.RedisUsername, c.RedisPassword = p.redis()
	c.RedisCluster = p.nodes("REDIS_CLUSTER")
	if len(c.RedisCluster) > 0 && c.RedisDB != 0 {
		p.fail("REDIS_CLUSTER", p.getenv("REDIS_CLUSTER"), "a Redis Cluster has only database 0; REDIS_URL names another")
	}
	if c.AuthReads && strings.TrimSpace(p.getenv("AUTH_TOKENS")) == "" {
		p.fail("AUTH_READS", "true", "needs AUTH_TOKENS: the tokens reads would need")
	}
	return c, errors.Join(p.errs...)
}

// envParser collects one error per invalid variable instead of stopping at
// the first.
type envParser struct {
	getenv func(string) string
	errs   []error
}

func (p *envParser) fail(name, value, why string) {
	p.errs = append(p.errs, fmt.Errorf("%s=%q: %s", name, value, why))
}

// str returns the variable's value, or def when it is unset or empty.
func (p *envParser) str(name, def string) string {
	if v := strings.TrimSpace(p.getenv(name)); v != "" {
		return v
	}
	return def
}

func (p *envParser) oneOf(name, def string, allowed ...string) string {
	v := strings.ToLower(p.str(name, def))
	for _, a := range allowed {
		if v == a {
			return v
		}
	}
	p.fail(name, v, "must be one of "+strings.Join(allowed, ", "))
	return def
}

func (p *envParser) integer(name, def string, lo, hi int) int {
	s := p.str(name, def)
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		p.fail(name, s, fmt.Sprintf("must be a whole number from %d to %d", lo, hi))
		return 0
	}
	return n
}

// minTokenLen keeps tokens too long to guess, given that every guess
// costs one of an address's RATE_LIMIT requests.
const minTokenLen = 16

// tokens reads a comma-separated list of secrets. Its errors never show
// the value.
func (p *envParser) tokens(name string) []string {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return nil
	}
	var out []string
	for i, t := range strings.Split(v, ",") {
		t = strings.TrimSpace(t)
		ok := len(t) >= minTokenLen && len(t) <= 256
		for j := 0; j < len(t) && ok; j++ {
			ok = t[j] > ' ' && t[j] < 0x7f
		}
		if !ok {
			p.errs = append(p.errs, fmt.Errorf("%s: token %d of the list must be %d to 256 printable ASCII characters without spaces (the value is not shown)", name, i+1, minTokenLen))
			continue
		}
		out = append(out, t)
	}
	return out
}

func (p *envParser) boolean(name, def string) bool {
	s := p.str(name, def)
	b, err := strconv.ParseBool(s)
	if err != nil {
		p.fail(name, s, "must be true or false")
	}
	return b
}

func (p *envParser) probability(name, def string) float64 {
	s := p.str(name, def)
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || !(f >= 0 && f <= 1) {
		p.fail(name, s, "must be a number from 0 to 1")
		return 0
	}
	return f
}

// duration accepts a Go duration ("1500ms", "5m") or a plain number of
// seconds ("60", "0.5") and requires it to be positive.
func (p *envParser) duration(name, def string) time.Duration {
	d, ok := p.durationVar(name, def)
	if ok && d == 0 {
		p.fail(name, p.str(name, def), "must be greater than zero")
	}
	return d
}

// durationOrZero is duration for settings where zero is meaningful.
func (p *envParser) durationOrZero(name, def string) time.Duration {
	d, _ := p.durationVar(name, def)
	return d
}

func (p *envParser) durationVar(name, def string) (time.Duration, bool) {
	s := p.str(name, def)
	d, err := parseDuration(s)
	if err != nil || d < 0 {
		p.fail(name, s, "must be a Go duration such as 1500ms or 10s, or a number of seconds, not negative")
		return 0, false
	}
	return d, true
}

// retention reads RETENTION_1S, _1M, _1H and _1D: whole seconds, 0 for
// forever, each at least as long as the one finer than it, since a coarser
// resolution must keep whatever a finer one keeps.
func (p *envParser) retention() retention {
	var h retention
	defaults := [numRes]string{"1h", "7d", "90d", "0"}
	prev := int64(0)
	for r := res1s; r < numRes; r++ {
		name := "RETENTION_" + strings.ToUpper(r.String())
		d, ok := p.durationVar(name, defaults[r])
		if !ok {
			continue
		}
		if d%time.Second != 0 {
			p.fail(name, p.str(name, defaults[r]), "must be a whole number of seconds")
			continue
		}
		h[r] = int64(d / time.Second)
		if r > res1s && h[r] != 0 && (prev == 0 || h[r] < prev) {
			p.fail(name, p.str(name, defaults[r]), fmt.Sprintf("must be 0 (forever) or at least RETENTION_%s, since a coarser resolution keeps whatever a finer one keeps",
				strings.ToUpper((r-1).String())))
		}
		prev = h[r]
	}
	return h
}

// parseDuration accepts a Go duration, a number of seconds, or either
// after a whole number of days ("7d", "1d12h").
func parseDuration(s string) (time.Duration, error) {
	if days, rest, ok := strings.Cut(s, "d"); ok {
		n, err := strconv.ParseInt(days, 10, 64)
		if err != nil || n < 0 || n > 100*365 {
			return 0, errors.New("days must be a whole number")
		}
		d := time.Duration(n) * 24 * time.Hour
		if rest == "" {
			return d, nil
		}
		r, err := time.ParseDuration(rest)
		if err != nil || r < 0 {
			return 0, errors.New("bad duration after the days")
		}
		return d + r, nil
	}
	return parseSecondsOrDuration(s)
}

func parseSecondsOrDuration(s string) (time.Duration, error) {
	if secs, err := strconv.ParseFloat(s, 64); err == nil {
		if math.IsNaN(secs) || math.IsInf(secs, 0) || math.Abs(secs) > math.MaxInt64/float64(time.Second) {
			return 0, errors.New("out of range")
		}
		return time.Duration(secs * float64(time.Second)), nil
	}
	return time.ParseDuration(s)
}

func (p *envParser) level(name, def string) slog.Level {
	s := p.str(name, def)
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		p.fail(name, s, "must be one of debug, info, warn, error")
	}
	return l
}

// prefixes parses a comma-separated list of CIDRs; a bare address means
// that single host.
func (p *envParser) prefixes(name string) []netip.Prefix {
	var out []netip.Prefix
	for _, f := range strings.Split(p.getenv(name), ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		pfx, err := netip.ParsePrefix(f)
		if err != nil {
			addr, aerr := netip.ParseAddr(f)
			if aerr != nil {
				p.fail(name, f, "must be a comma-separated list of CIDRs such as 10.0.0.0/8")
				continue
			}
			pfx = netip.PrefixFrom(addr, addr.BitLen())
		}
		out = append(out, pfx.Masked())
	}
	return out
}

func (p *envParser) httpURL(name string) string {
	s := p.str(name, "")
	if s == "" {
		return ""
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		p.fail(name, s, "must be an http:// or https:// URL")
		return ""
	}
	return s
}

// redis resolves REDIS_URL, or REDIS_HOST and REDIS_PORT when it is unset.
func (p *envParser) redis() (addr string, db int, user, password string) {
	raw := p.str("REDIS_URL", "")
	if raw == "" {
		host := p.str("REDIS_HOST", "localhost")
		port := p.integer("REDIS_PORT", "6379", 1, 65535)
		return net.JoinHostPort(host, strconv.Itoa(port)), 0, "", ""
	}
	u, err := url.Parse(raw)
	shown := "(unparseable)" // never the raw value: it may hold a password
	if err == nil {
		shown = u.Redacted()
	}
	if err != nil || u.Scheme != "redis" || u.Host == "" {
		p.fail("REDIS_URL", shown, "must look like redis://[user:password@]host:port[/db]")
		return "", 0, "", ""
	}
	addr = u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "6379")
	}
	if path := strings.TrimPrefix(u.Path, "/"); path != "" {
		db, err = strconv.Atoi(path)
		if err != nil || db < 0 {
			p.fail("REDIS_URL", shown, "database must be a whole number")
			return "", 0, "", ""
		}
	}
	if u.User != nil {
		user = u.User.Username()
		password, _ = u.User.Password()
	}
	return addr, db, user, password
}

// nodes parses a comma-separated list of host:port addresses.
func (p *envParser) nodes(name string) []string {
	var out []string
	for _, f := range strings.Split(p.getenv(name), ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		host, port, err := net.SplitHostPort(f)
		if n, perr := strconv.Atoi(port); err != nil || host == "" || perr != nil || n < 1 || n > 65535 {
			p.fail(name, f, "must be a comma-separated list of host:port addresses")
			continue
		}
		out = append(out, f)
	}
	return out
}
