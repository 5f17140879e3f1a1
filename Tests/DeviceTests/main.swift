import DmaBuf

#if canImport(Glibc)
import Glibc
#endif

// `dmabuf-device-tests [PREFIX...]` runs the suite (tests whose names start with a PREFIX);
// `dmabuf-device-tests --child ROLE ARGS...` is how tests start a second process.
let arguments = Array(CommandLine.arguments.dropFirst())
if arguments.first == "--child" {
    exit(Children.run(role: arguments.dropFirst().first ?? "", arguments: Array(arguments.dropFirst(2))))
}
let suite = HeapTests.all + UDmabufTests.all + DmaBufferTests.all + FenceTests.all + PageRunTests.all
exit(Harness.main(tests: suite, filter: arguments))
