// Command discovector cross-checks natlib.disco against Tailscale's disco package (the
// tailscale.com version pinned in ../go.mod).
//
// It reads one JSON object on stdin:
//
//	{"sender": "<hex private key>", "receiver": "<hex private key>", "open": ["<hex packet>", ...]}
//
// and writes one JSON object on stdout: "plaintexts" (AppendMarshal of a fixed set of messages),
// "sealed" (the same messages sealed by Go from sender to receiver, random nonces) and "opened"
// (each "open" packet opened by Go as receiver and summarised, or an error).
// tests/test_disco.py embeds one run of it as test vectors (the keys are SENDER and RECEIVER
// there, the "open" packets our fixed-nonce seals of the same messages); to re-check by hand:
//
//	cd tests/interop && go run ./discovector < input.json
package main

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"

	"go4.org/mem"
	"tailscale.com/disco"
	"tailscale.com/types/key"
)

type input struct {
	Sender   string   `json:"sender"`
	Receiver string   `json:"receiver"`
	Open     []string `json:"open"`
}

type output struct {
	SenderPublic string   `json:"sender_public"`
	Plaintexts   []string `json:"plaintexts"`
	Sealed       []string `json:"sealed"`
	Opened       []string `json:"opened"`
}

func privateKey(h string) key.DiscoPrivate {
	raw, err := hex.DecodeString(h)
	if err != nil || len(raw) != 32 {
		panic("bad private key hex")
	}
	return key.DiscoPrivateFromRaw32(mem.B(raw))
}

func messages() []disco.Message {
	var tx [12]byte
	for i := range tx {
		tx[i] = byte(i + 1)
	}
	node := key.NodePublicFromRaw32(mem.B([]byte("0123456789abcdef0123456789abcdef")))
	return []disco.Message{
		&disco.Ping{TxID: tx},
		&disco.Ping{TxID: tx, NodeKey: node},
		&disco.Ping{TxID: tx, NodeKey: node, Padding: 7},
		&disco.Pong{TxID: tx, Src: netip.MustParseAddrPort("192.0.2.1:41641")},
		&disco.Pong{TxID: tx, Src: netip.MustParseAddrPort("[2001:db8::1]:3478")},
		&disco.CallMeMaybe{},
		&disco.CallMeMaybe{MyNumber: []netip.AddrPort{
			netip.MustParseAddrPort("198.51.100.7:41641"),
			netip.MustParseAddrPort("[2001:db8::2]:41641"),
		}},
	}
}

func describe(m disco.Message) string {
	switch m := m.(type) {
	case *disco.Ping:
		nk := ""
		if !m.NodeKey.IsZero() {
			nk = m.NodeKey.String()
		}
		return fmt.Sprintf("ping %x %s %d", m.TxID[:], nk, m.Padding)
	case *disco.Pong:
		return fmt.Sprintf("pong %x %s", m.TxID[:], m.Src)
	case *disco.CallMeMaybe:
		s := "cmm"
		for _, ap := range m.MyNumber {
			s += " " + ap.String()
		}
		return s
	default:
		return fmt.Sprintf("other %T", m)
	}
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	sender, receiver := privateKey(in.Sender), privateKey(in.Receiver)
	shared := sender.Shared(receiver.Public())
	out := output{SenderPublic: hex.EncodeToString(sender.Public().AppendTo(nil))}
	for _, m := range messages() {
		plain := m.AppendMarshal(nil)
		out.Plaintexts = append(out.Plaintexts, hex.EncodeToString(plain))
		pkt := append([]byte(disco.Magic), sender.Public().AppendTo(nil)...)
		pkt = append(pkt, shared.Seal(plain)...)
		out.Sealed = append(out.Sealed, hex.EncodeToString(pkt))
	}
	for _, h := range in.Open {
		pkt, err := hex.DecodeString(h)
		if err != nil {
			panic(err)
		}
		src, ok := disco.Source(pkt)
		if !ok {
			out.Opened = append(out.Opened, "error: not disco")
			continue
		}
		theirs := key.DiscoPublicFromRaw32(mem.B(src))
		plain, ok := receiver.Shared(theirs).Open(pkt[len(disco.Magic)+32:])
		if !ok {
			out.Opened = append(out.Opened, "error: does not open")
			continue
		}
		m, err := disco.Parse(plain)
		if err != nil {
			out.Opened = append(out.Opened, "error: "+err.Error())
			continue
		}
		out.Opened = append(out.Opened, describe(m))
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		panic(err)
	}
}
