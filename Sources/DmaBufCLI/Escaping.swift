// The one escaping helper. Tags, names, cgroups, process names and daemon messages are chosen by clients
// (or any process on the system), so nothing dmabufctl prints may carry a control character, a bidi
// override or another invisible character to the terminal or to whatever parses the output.
//
// - Fields (`printable`): every non-printable scalar, newlines included, becomes a visible escape, and `\`
//   becomes `\\`, so the text is unambiguous: `a\nb` in the output always means the six visible characters.
// - Whole outputs (`Console`): a last net, `printableLines`, escapes whatever a formatter missed but keeps
//   the newlines that separate lines (and leaves `\` alone, so a field escaped above is not escaped twice).
// - JSON (`jsonSafe`): JSONEncoder already escapes C0 controls; the rest become `\uXXXX` escapes, so the
//   output stays valid JSON and decodes to the exact string.

/// True for what a terminal shows as itself: not a control (C0, DEL, C1), format (bidi overrides,
/// zero-width characters), line or paragraph separator, private-use, surrogate or unassigned scalar.
func isPrintable(_ scalar: Unicode.Scalar) -> Bool {
    switch scalar.properties.generalCategory {
    case .control, .format, .lineSeparator, .paragraphSeparator, .privateUse, .surrogate, .unassigned: false
    default: true
    }
}

/// `scalar` as an escape: `\n`, `\t`, `\r`, `\x1b` below U+0080, `\u{202e}` above.
func escaped(_ scalar: Unicode.Scalar) -> String {
    switch scalar {
    case "\n": return "\\n"
    case "\t": return "\\t"
    case "\r": return "\\r"
    default:
        let hex = String(scalar.value, radix: 16)
        return scalar.value < 0x80 ? "\\x" + (hex.count < 2 ? "0" + hex : hex) : "\\u{\(hex)}"
    }
}

/// A client-chosen field made safe to print: non-printable scalars escaped, `\` doubled.
public func printable(_ text: String) -> String {
    guard text.unicodeScalars.contains(where: { !isPrintable($0) || $0 == "\\" }) else { return text }
    var out = ""
    for scalar in text.unicodeScalars {
        if scalar == "\\" { out += "\\\\" } else if isPrintable(scalar) { out.unicodeScalars.append(scalar) } else { out += escaped(scalar) }
    }
    return out
}

/// A whole output made safe to print: non-printable scalars escaped, except the newlines between lines.
public func printableLines(_ text: String) -> String {
    guard text.unicodeScalars.contains(where: { !isPrintable($0) && $0 != "\n" }) else { return text }
    var out = ""
    for scalar in text.unicodeScalars {
        if isPrintable(scalar) || scalar == "\n" { out.unicodeScalars.append(scalar) } else { out += escaped(scalar) }
    }
    return out
}

/// JSON text with every non-printable scalar that JSONEncoder left raw written as a `\uXXXX` escape
/// (a surrogate pair above U+FFFF). Such scalars can only occur inside strings, so the result is valid
/// JSON that decodes to the same values.
public func jsonSafe(_ json: String) -> String {
    guard json.unicodeScalars.contains(where: { !isPrintable($0) && $0 != "\n" }) else { return json }
    var out = ""
    for scalar in json.unicodeScalars {
        if isPrintable(scalar) || scalar == "\n" {
            out.unicodeScalars.append(scalar)
        } else {
            for unit in String(scalar).utf16 {
                let hex = String(unit, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            }
        }
    }
    return out
}
