// Command derpcheck is meshrelay's interop probe: a small DERP client built on Tailscale's own
// Go packages (tailscale.com/derp, tailscale.com/derp/derphttp, tailscale.com/net/stun) at the
// version pinned in ../go.mod. The Python tests in this directory run it against our relay, and
// run our natlib client against Tailscale's derper built from the same module.
//
// Output is one JSON object per line on stdout (the tests parse it); diagnostics go to stderr.
// Any mismatch or error exits non-zero with a line {"event":"error","error":"..."} explaining it.
//
// Subcommands:
//
//	derpcheck genkey
//	    Print a new node key pair: {"event":"key","private":"privkey:…","public":"nodekey:…"}.
//	derpcheck client [flags]
//	    Connect to a DERP server and do what the flags say, in this order: connect (print
//	    "connected"), optionally ping, send -count packets to -send-to and expect them echoed
//	    back, then stay until stdin reaches EOF (if -stay) while printing every received frame;
//	    -echo returns every received packet to its sender (except its own -count packets coming
//	    back from -send-to).
//	derpcheck stun -addr HOST:PORT
//	    Send one Tailscale STUN binding request and print the mapped address.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

var outMu sync.Mutex

// emit prints one JSON line on stdout.
func emit(event string, fields map[string]any) {
	m := map[string]any{"event": event}
	for k, v := range fields {
		m[k] = v
	}
	b, err := json.Marshal(m)
	if err != nil {
		panic(err)
	}
	outMu.Lock()
	defer outMu.Unlock()
	os.Stdout.Write(append(b, '\n'))
}

// fail prints an error line and exits 1.
func fail(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	emit("error", map[string]any{"error": msg})
	fmt.Fprintln(os.Stderr, "derpcheck: "+msg)
	os.Exit(1)
}

func main() {
	log.SetOutput(os.Stderr)
	log.SetPrefix("derpcheck: ")
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: derpcheck genkey | client [flags] | stun -addr HOST:PORT")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "genkey":
		k := key.NewNode()
		priv, _ := k.MarshalText()
		emit("key", map[string]any{"private": string(priv), "public": k.Public().String()})
	case "client":
		runClient(os.Args[2:])
	case "stun":
		runSTUN(os.Args[2:])
	default:
		fmt.Fprintf(os.Stderr, "derpcheck: unknown subcommand %q\n", os.Args[1])
		os.Exit(2)
	}
}

type clientFlags struct {
	url         string
	keyText     string
	caFile      string
	certName    string
	insecure    bool
	meshKeyHex  string
	watch       bool
	preferred   bool
	sendTo      string
	count       int
	size        int
	expectEcho  bool
	echo        bool
	pings       int
	stay        bool
	timeout     time.Duration
	wantFast    string
	recvVerbose bool
}

// payloadPrefix starts every packet that -count sends. -echo does not return such packets when
// they come from -send-to (they are our own packets echoed back), so two echoing sides do not
// bounce them back and forth forever.
const payloadPrefix = "derpcheck packet "

// payload is packet i of a run: a recognisable prefix, then filler up to size bytes.
func payload(i, size int) []byte {
	p := []byte(fmt.Sprintf(payloadPrefix+"%d;", i))
	for len(p) < size {
		p = append(p, byte('a'+(len(p)+i)%26))
	}
	return p
}

func runClient(args []string) {
	var f clientFlags
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	fs.StringVar(&f.url, "url", "", "DERP URL: http://host:port/derp or https://host:port/derp")
	fs.StringVar(&f.keyText, "key", "", "node private key (privkey:…); default: a new one")
	fs.StringVar(&f.caFile, "ca", "", "https: PEM file of extra trusted roots")
	fs.StringVar(&f.certName, "certname", "", "https: DERPNode.CertName, e.g. sha256-raw:<hex> (dials as a DERP region)")
	fs.BoolVar(&f.insecure, "insecure", false, "https: DERPNode.InsecureForTests (dials as a DERP region)")
	fs.StringVar(&f.meshKeyHex, "mesh-key", "", "mesh key, 64 hex digits")
	fs.BoolVar(&f.watch, "watch", false, "subscribe to PeerPresent/PeerGone (needs -mesh-key)")
	fs.BoolVar(&f.preferred, "preferred", false, "send NotePreferred(true) after connecting")
	fs.StringVar(&f.sendTo, "send-to", "", "peer key (nodekey:…) to send -count packets to")
	fs.IntVar(&f.count, "count", 0, "packets to send to -send-to")
	fs.IntVar(&f.size, "size", 100, "bytes per packet")
	fs.BoolVar(&f.expectEcho, "expect-echo", false, "expect every sent packet back from -send-to, byte for byte")
	fs.BoolVar(&f.echo, "echo", false, "send every received packet back to its sender")
	fs.IntVar(&f.pings, "ping", 0, "DERP pings (Ping/Pong) to do after connecting")
	fs.BoolVar(&f.stay, "stay", false, "after the active steps, keep receiving until stdin reaches EOF")
	fs.DurationVar(&f.timeout, "timeout", 20*time.Second, "deadline for the active steps (connect, pings, send/echo)")
	fs.StringVar(&f.wantFast, "want-metacert", "", "https: \"true\"/\"false\": require (or forbid) the meta-certificate that makes derphttp use fast start")
	fs.BoolVar(&f.recvVerbose, "print-packets", true, "print every received packet (length and first 48 bytes)")
	fs.Parse(args)
	if f.url == "" {
		fail("-url is required")
	}

	var priv key.NodePrivate
	if f.keyText == "" {
		priv = key.NewNode()
	} else if err := priv.UnmarshalText([]byte(f.keyText)); err != nil {
		fail("bad -key: %v", err)
	}
	var peer key.NodePublic
	if f.sendTo != "" {
		if err := peer.UnmarshalText([]byte(f.sendTo)); err != nil {
			fail("bad -send-to: %v", err)
		}
	}

	c := newDERPClient(f, priv)
	defer c.Close()

	ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		fail("connect to %s: %v", f.url, err)
	}
	connected := map[string]any{
		"self":   priv.Public().String(),
		"server": c.ServerPublicKey().String(),
	}
	if cs, ok := c.TLSConnectionState(); ok && cs != nil {
		connected["tls_version"] = tls.VersionName(cs.Version)
		meta := hasMetaCert(cs.PeerCertificates)
		connected["metacert"] = cs.Version >= tls.VersionTLS13 && meta
		if f.wantFast != "" && strconv.FormatBool(cs.Version >= tls.VersionTLS13 && meta) != f.wantFast {
			fail("meta-certificate (fast start) = %v, want %s", meta, f.wantFast)
		}
	}
	emit("connected", connected)

	// One goroutine reads everything. Echoed packets from the peer go to echoCh.
	echoCh := make(chan []byte, 1024)
	recvErr := make(chan error, 1)
	var closing sync.WaitGroup
	closing.Add(1)
	go func() {
		defer closing.Done()
		for {
			m, err := c.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			switch m := m.(type) {
			case derp.ReceivedPacket:
				if f.recvVerbose {
					head := m.Data[:min(len(m.Data), 48)]
					emit("recv", map[string]any{"src": m.Source.String(), "len": len(m.Data), "head": string(head)})
				}
				ownEcho := f.count > 0 && m.Source == peer && bytes.HasPrefix(m.Data, []byte(payloadPrefix))
				if f.echo && !ownEcho {
					if err := c.Send(m.Source, bytes.Clone(m.Data)); err != nil {
						recvErr <- fmt.Errorf("echo send: %w", err)
						return
					}
				}
				if !peer.IsZero() && m.Source == peer {
					echoCh <- bytes.Clone(m.Data)
				}
			case derp.PeerGoneMessage:
				emit("peer_gone", map[string]any{"key": m.Peer.String(), "reason": int(m.Reason)})
			case derp.PeerPresentMessage:
				emit("peer_present", map[string]any{"key": m.Key.String(), "addr": m.IPPort.String(), "flags": int(m.Flags)})
			case derp.ServerInfoMessage:
				emit("server_info", map[string]any{"rate": m.TokenBucketBytesPerSecond, "burst": m.TokenBucketBytesBurst})
			case derp.PingMessage:
				emit("server_ping", map[string]any{"data": hex.EncodeToString(m[:])})
			case derp.PongMessage:
				emit("pong_unsolicited", map[string]any{"data": hex.EncodeToString(m[:])})
			case derp.KeepAliveMessage:
				emit("keepalive", nil)
			case derp.HealthMessage:
				emit("health", map[string]any{"problem": m.Problem})
			case derp.ServerRestartingMessage:
				emit("restarting", map[string]any{"reconnect_in_ms": m.ReconnectIn.Milliseconds(), "try_for_ms": m.TryFor.Milliseconds()})
			default:
				emit("other", map[string]any{"type": fmt.Sprintf("%T", m)})
			}
		}
	}()

	for i := 0; i < f.pings; i++ {
		start := time.Now()
		if err := c.Ping(ctx); err != nil {
			fail("ping %d: %v", i, err)
		}
		emit("pong", map[string]any{"seq": i, "rtt_us": time.Since(start).Microseconds()})
	}

	if f.count > 0 {
		if peer.IsZero() {
			fail("-count needs -send-to")
		}
		for i := 0; i < f.count; i++ {
			if err := c.Send(peer, payload(i, f.size)); err != nil {
				fail("send %d: %v", i, err)
			}
		}
		emit("sent", map[string]any{"to": peer.String(), "count": f.count})
		if f.expectEcho {
			for i := 0; i < f.count; i++ {
				select {
				case got := <-echoCh:
					if want := payload(i, f.size); !bytes.Equal(got, want) {
						fail("echoed packet %d: got %d bytes %q, want %d bytes %q", i, len(got), trunc(got), len(want), trunc(want))
					}
				case err := <-recvErr:
					fail("receive after %d of %d echoes: %v", i, f.count, err)
				case <-ctx.Done():
					fail("only %d of %d packets echoed back within %v", i, f.count, f.timeout)
				}
			}
			emit("echoed", map[string]any{"from": peer.String(), "count": f.count})
		}
	}

	if f.stay {
		emit("staying", nil)
		stdinEOF := make(chan struct{})
		go func() {
			r := bufio.NewReader(os.Stdin)
			for {
				if _, err := r.ReadString('\n'); err != nil {
					close(stdinEOF)
					return
				}
			}
		}()
		select {
		case <-stdinEOF:
		case err := <-recvErr:
			fail("receive: %v", err)
		}
	} else {
		select {
		case err := <-recvErr:
			fail("receive: %v", err)
		default:
		}
	}
	c.Close()
	emit("closed", nil)
}

func trunc(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "…"
	}
	return string(b)
}

// newDERPClient makes a derphttp client for the flags: a URL client (plain HTTP, or HTTPS with
// extra roots from -ca), or a one-node DERP region when -certname or -insecure is given, which is
// how tailscaled itself dials a self-hosted node.
func newDERPClient(f clientFlags, priv key.NodePrivate) *derphttp.Client {
	netMon := netmon.NewStatic()
	logf := func(format string, args ...any) { log.Printf(format, args...) }
	if f.certName != "" || f.insecure {
		u, err := url.Parse(f.url)
		if err != nil {
			fail("bad -url: %v", err)
		}
		if u.Scheme != "https" {
			fail("-certname/-insecure need an https URL")
		}
		port, _ := strconv.Atoi(u.Port())
		node := &tailcfg.DERPNode{
			Name:             "900a",
			RegionID:         900,
			HostName:         u.Hostname(),
			CertName:         f.certName,
			DERPPort:         port,
			InsecureForTests: f.insecure,
			STUNPort:         -1,
		}
		if ip, err := netip.ParseAddr(u.Hostname()); err == nil && ip.Is4() {
			node.IPv4 = ip.String()
		} else if err == nil {
			node.IPv6 = ip.String()
		}
		region := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "interop", Nodes: []*tailcfg.DERPNode{node}}
		c := derphttp.NewRegionClient(priv, logf, netMon, func() *tailcfg.DERPRegion { return region })
		configure(c, f)
		return c
	}
	c, err := derphttp.NewClient(priv, f.url, logf, netMon)
	if err != nil {
		fail("%v", err)
	}
	if f.caFile != "" {
		pem, err := os.ReadFile(f.caFile)
		if err != nil {
			fail("read -ca: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			fail("no certificates in %s", f.caFile)
		}
		c.TLSConfig = &tls.Config{RootCAs: pool}
	}
	configure(c, f)
	return c
}

func configure(c *derphttp.Client, f clientFlags) {
	if f.meshKeyHex != "" {
		mk, err := key.ParseDERPMesh(f.meshKeyHex)
		if err != nil {
			fail("bad -mesh-key: %v", err)
		}
		c.MeshKey = mk
	}
	c.WatchConnectionChanges = f.watch
	c.SetCanAckPings(true)
	if f.preferred {
		c.NotePreferred(true)
	}
}

// hasMetaCert reports whether the chain holds a DERP meta-certificate (CN "derpkey<hex>", serial
// of at most 8 bits), which is what makes derphttp skip the HTTP upgrade response (fast start).
func hasMetaCert(certs []*x509.Certificate) bool {
	for _, cert := range certs {
		if strings.HasPrefix(cert.Subject.CommonName, "derpkey") && cert.SerialNumber.BitLen() <= 8 {
			return true
		}
	}
	return false
}

func runSTUN(args []string) {
	fs := flag.NewFlagSet("stun", flag.ExitOnError)
	addr := fs.String("addr", "", "STUN server HOST:PORT")
	timeout := fs.Duration("timeout", 5*time.Second, "deadline for the answer")
	fs.Parse(args)
	if *addr == "" {
		fail("-addr is required")
	}
	raddr, err := net.ResolveUDPAddr("udp", *addr)
	if err != nil {
		fail("resolve %s: %v", *addr, err)
	}
	conn, err := net.DialUDP("udp", nil, raddr)
	if err != nil {
		fail("dial %s: %v", *addr, err)
	}
	defer conn.Close()
	txID := stun.NewTxID()
	if _, err := conn.Write(stun.Request(txID)); err != nil {
		fail("send: %v", err)
	}
	conn.SetReadDeadline(time.Now().Add(*timeout))
	buf := make([]byte, 1500)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				fail("no STUN answer from %s within %v", *addr, *timeout)
			}
			fail("read: %v", err)
		}
		if !stun.Is(buf[:n]) {
			fail("answer is not STUN: % x", buf[:n])
		}
		gotTx, mapped, err := stun.ParseResponse(buf[:n])
		if err != nil {
			fail("parse answer % x: %v", buf[:n], err)
		}
		if gotTx != txID {
			fail("answer for transaction %x, want %x", gotTx, txID)
		}
		local := conn.LocalAddr().(*net.UDPAddr).AddrPort()
		emit("stun", map[string]any{"mapped": mapped.String(), "local": local.String(), "len": n})
		if mapped.Addr().Unmap() != local.Addr().Unmap() || mapped.Port() != local.Port() {
			fail("mapped address %v is not our address %v", mapped, local)
		}
		return
	}
}
