// Command c3-node-proxy is one stable address in front of a Comput3 user's
// GPU nodes: it finds the nodes of the API key each request carries and
// forwards the request to one of them, by tag or by position.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	defaultAPIURL          = "https://api.comput3.ai/api/v0"
	defaultPort            = 8080
	defaultRefreshInterval = 60 * time.Second
	defaultIdleTimeout     = 3 * time.Minute
	defaultShutdownTimeout = 30 * time.Second
	defaultNodeScheme      = "https"
	defaultAPITimeout      = 10 * time.Second
	defaultAPIConcurrency  = 32
	defaultMaxKeys         = 10000
	defaultRetries         = 2

	defaultReadHeaderTimeout = 10 * time.Second
	defaultIdleConnTimeout   = 120 * time.Second
	maxHeaderBytes           = 64 << 10
)

// config is everything the environment can set, parsed once.
type config struct {
	apiURL          *url.URL      // API_URL: Comput3 API base, default defaultAPIURL
	port            int           // PORT: listen port on all interfaces, default 8080
	logLevel        slog.Level    // LOG_LEVEL: default INFO
	logJSON         bool          // LOG_FORMAT=json; default text
	refreshInterval time.Duration // REFRESH_INTERVAL: re-fetch period of active keys, default 60s
	idleTimeout     time.Duration // IDLE_TIMEOUT: unused keys are evicted after it, default 3m
	nodeScheme      string        // NODE_SCHEME: http or https for host[:port] nodes, default https
	shutdownTimeout time.Duration // SHUTDOWN_TIMEOUT: grace for in-flight requests, default 30s
	apiTimeout      time.Duration // API_TIMEOUT: bound of one workloads fetch, default 10s
	apiConcurrency  int           // API_CONCURRENCY: workloads fetches at once, default 32
	maxKeys         int           // MAX_KEYS: keys cached at most, default 10000
	retries         int           // RETRIES: extra nodes a failed tag request may try, default 2
	accessLog       bool          // ACCESS_LOG: one INFO line per request, default false

	// Not from the environment; tests shorten them.
	readHeaderTimeout time.Duration // slow clients get this long to send their headers
	idleConnTimeout   time.Duration // keep-alive connections are closed after this long unused
}

// loadConfig reads the configuration through getenv; an invalid value is an
// error naming the variable and the value.
func loadConfig(getenv func(string) string) (config, error) {
	cfg := config{
		port:            defaultPort,
		logLevel:        slog.LevelInfo,
		refreshInterval: defaultRefreshInterval,
		idleTimeout:     defaultIdleTimeout,
		nodeScheme:      defaultNodeScheme,
		shutdownTimeout: defaultShutdownTimeout,
		apiTimeout:      defaultAPITimeout,
		apiConcurrency:  defaultAPIConcurrency,
		maxKeys:         defaultMaxKeys,
		retries:         defaultRetries,

		readHeaderTimeout: defaultReadHeaderTimeout,
		idleConnTimeout:   defaultIdleConnTimeout,
	}
	apiURL := getenv("API_URL")
	if apiURL == "" {
		apiURL = defaultAPIURL
	}
	u, err := url.Parse(apiURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return config{}, fmt.Errorf("API_URL=%q: want an absolute http(s) URL", apiURL)
	}
	cfg.apiURL = u

	if v := getenv("PORT"); v != "" {
		p, err := strconv.Atoi(v)
		if err != nil || p < 0 || p > 65535 {
			return config{}, fmt.Errorf("PORT=%q: want a port number from 0 to 65535", v)
		}
		cfg.port = p
	}
	if v := getenv("LOG_LEVEL"); v != "" {
		if err := cfg.logLevel.UnmarshalText([]byte(v)); err != nil || strings.ContainsAny(v, "+-") {
			return config{}, fmt.Errorf("LOG_LEVEL=%q: want DEBUG, INFO, WARN or ERROR", v)
		}
	}
	switch v := getenv("LOG_FORMAT"); strings.ToLower(v) {
	case "", "text":
	case "json":
		cfg.logJSON = true
	default:
		return config{}, fmt.Errorf("LOG_FORMAT=%q: want text or json", v)
	}
	if v := getenv("ACCESS_LOG"); v != "" {
		on, err := strconv.ParseBool(v)
		if err != nil {
			return config{}, fmt.Errorf("ACCESS_LOG=%q: want true or false", v)
		}
		cfg.accessLog = on
	}
	switch v := getenv("NODE_SCHEME"); strings.ToLower(v) {
	case "":
	case "http", "https":
		cfg.nodeScheme = strings.ToLower(v)
	default:
		return config{}, fmt.Errorf("NODE_SCHEME=%q: want http or https", v)
	}
	for _, d := range []struct {
		name string
		dst  *time.Duration
	}{
		{"REFRESH_INTERVAL", &cfg.refreshInterval},
		{"IDLE_TIMEOUT", &cfg.idleTimeout},
		{"SHUTDOWN_TIMEOUT", &cfg.shutdownTimeout},
		{"API_TIMEOUT", &cfg.apiTimeout},
	} {
		if v := getenv(d.name); v != "" {
			dur, err := time.ParseDuration(v)
			if err != nil || dur <= 0 {
				return config{}, fmt.Errorf("%s=%q: want a positive duration such as 60s", d.name, v)
			}
			*d.dst = dur
		}
	}
	for _, n := range []struct {
		name string
		dst  *int
		min  int
	}{
		{"API_CONCURRENCY", &cfg.apiConcurrency, 1},
		{"MAX_KEYS", &cfg.maxKeys, 1},
		{"RETRIES", &cfg.retries, 0},
	} {
		if v := getenv(n.name); v != "" {
			i, err := strconv.Atoi(v)
			if err != nil || i < n.min {
				return config{}, fmt.Errorf("%s=%q: want a whole number of at least %d", n.name, v, n.min)
			}
			*n.dst = i
		}
	}
	return cfg, nil
}

func newLogger(w io.Writer, cfg config) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.logLevel}
	if cfg.logJSON {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// newNodeTransport is the client side towards the nodes: keep-alive pools
// sized for many concurrent streams per node, HTTP/2 to TLS nodes that offer
// it, bounded dial and handshake times, and no response timeout (a model may
// take minutes before its first token).
func newNodeTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.Proxy = nil // nodes are reached directly, whatever HTTP_PROXY says
	// The client's Accept-Encoding goes to the node as it is, and a
	// compressed answer comes back untouched: no gzip asked on the client's
	// behalf, none undone here.
	t.DisableCompression = true
	t.MaxIdleConns = 1024
	t.MaxIdleConnsPerHost = 256
	t.IdleConnTimeout = 90 * time.Second
	t.TLSHandshakeTimeout = 10 * time.Second
	t.ExpectContinueTimeout = 1 * time.Second
	return t
}

// newAPIClient talks to the Comput3 API: one idle connection kept per
// concurrent fetch allowed, so refresh rounds reuse them.
func newAPIClient(cfg config) *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConnsPerHost = cfg.apiConcurrency
	return &http.Client{Transport: t}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Getenv, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "c3-node-proxy:", err)
		stop()
		os.Exit(1)
	}
}

// run loads the configuration, listens on PORT and serves until ctx ends.
func run(ctx context.Context, getenv func(string) string, stderr io.Writer) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	log := newLogger(stderr, cfg)
	ln, err := net.Listen("tcp", ":"+strconv.Itoa(cfg.port))
	if err != nil {
		return err
	}
	p := newProxy(newCache(cfg.apiURL, newAPIClient(cfg), cfg, log), newBalancer(), newNodeTransport(), cfg, log)
	return serve(ctx, cfg, ln, p, log)
}

// serve answers on ln until ctx ends, then shuts down gracefully: no new
// connections, in-flight requests and streams get cfg.shutdownTimeout to
// finish, the refresher stops. It returns nil after a clean or timed-out
// shutdown.
func serve(ctx context.Context, cfg config, ln net.Listener, p *proxy, log *slog.Logger) error {
	c, b := p.cache, p.bal
	srv := &http.Server{
		Handler:           p,
		ReadHeaderTimeout: cfg.readHeaderTimeout,
		IdleTimeout:       cfg.idleConnTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}

	refreshCtx, stopRefresh := context.WithCancel(context.Background())
	defer func() {
		stopRefresh()
		<-c.stopped
	}()
	go c.refreshLoop(refreshCtx, func() {
		used := c.nodeHosts()
		b.retain(func(host string) bool { return used[host] })
	})

	log.Info("c3-node-proxy listening", "addr", ln.Addr().String(), "api_url", cfg.apiURL.Redacted(),
		"node_scheme", cfg.nodeScheme, "refresh_interval", cfg.refreshInterval,
		"idle_timeout", cfg.idleTimeout, "shutdown_timeout", cfg.shutdownTimeout, "log_level", cfg.logLevel,
		"api_timeout", cfg.apiTimeout, "api_concurrency", cfg.apiConcurrency, "max_keys", cfg.maxKeys, "retries", cfg.retries, "access_log", cfg.accessLog)

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}

	log.Info("shutting down", "grace", cfg.shutdownTimeout)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		log.Warn("requests still running after the grace period; closing them", "err", err)
		srv.Close()
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	log.Info("stopped")
	return nil
}
