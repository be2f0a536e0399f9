// Applies for a key the way the wallet API family's Java SDK sends a
// request, for keyissuer's test of it (server/daemon/sdk_java_test.go):
// an HttpsURLConnection to the gateway URL with the JVM's default trust
// (-Djavax.net.ssl.trustStore=...), the Client-Id, Request-Time and
// Signature headers, and the answer's signature checked as the SDK checks
// it: the third comma-separated item of its Signature header.
//
// Usage: java -Djavax.net.ssl.trustStore=T SdkApply URL CLIENT_ID
// MERCHANT_KEY_PKCS8_B64_FILE SERVER_PUBLIC_KEY_B64_FILE BODY
//
// Prints "verified " and the answer's body on success; exits 1 with the
// reason otherwise.
import java.io.ByteArrayOutputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.URL;
import java.net.URLDecoder;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.KeyFactory;
import java.security.PrivateKey;
import java.security.PublicKey;
import java.security.Signature;
import java.security.spec.PKCS8EncodedKeySpec;
import java.security.spec.X509EncodedKeySpec;
import java.util.Base64;
import javax.net.ssl.HttpsURLConnection;

public class SdkApply {
    public static void main(String[] args) throws Exception {
        URL url = new URL(args[0]);
        String clientId = args[1];
        PrivateKey merchantKey = KeyFactory.getInstance("RSA").generatePrivate(
            new PKCS8EncodedKeySpec(Base64.getDecoder().decode(read(args[2]))));
        PublicKey serverKey = KeyFactory.getInstance("RSA").generatePublic(
            new X509EncodedKeySpec(Base64.getDecoder().decode(read(args[3]))));
        String body = args[4];
        String path = url.getPath();

        String requestTime = Long.toString(System.currentTimeMillis());
        String signature = sign("POST " + path + "\n" + clientId + "." + requestTime + "." + body, merchantKey);

        HttpsURLConnection conn = (HttpsURLConnection) url.openConnection();
        conn.setRequestMethod("POST");
        conn.setDoOutput(true);
        conn.setConnectTimeout(30000);
        conn.setReadTimeout(60000);
        conn.setRequestProperty("Content-Type", "application/json; charset=UTF-8");
        conn.setRequestProperty("Client-Id", clientId);
        conn.setRequestProperty("Request-Time", requestTime);
        conn.setRequestProperty("Signature", "algorithm=RSA256,keyVersion=1,signature="
            + URLEncoder.encode(signature, "UTF-8"));
        try (OutputStream out = conn.getOutputStream()) {
            out.write(body.getBytes(StandardCharsets.UTF_8));
        }
        int status = conn.getResponseCode();
        InputStream in = status < 400 ? conn.getInputStream() : conn.getErrorStream();
        ByteArrayOutputStream buf = new ByteArrayOutputStream();
        in.transferTo(buf);
        String rspBody = buf.toString(StandardCharsets.UTF_8);
        if (status != 200) {
            fail("HTTP " + status + ": " + rspBody);
        }

        String rspSignature = conn.getHeaderField("signature");
        if (rspSignature == null) {
            fail("the answer has no Signature header: " + rspBody);
        }
        String[] items = rspSignature.split(",");
        if (items.length < 3) {
            fail("the Signature header has " + items.length + " items: " + rspSignature);
        }
        String value = URLDecoder.decode(items[2].split("=", 2)[1], "UTF-8");
        String content = "POST " + path + "\n" + conn.getHeaderField("client-id") + "."
            + conn.getHeaderField("response-time") + "." + rspBody;
        Signature v = Signature.getInstance("SHA256withRSA");
        v.initVerify(serverKey);
        v.update(content.getBytes(StandardCharsets.UTF_8));
        if (!v.verify(Base64.getDecoder().decode(value))) {
            fail("the answer's signature does not verify over " + path + ": " + rspBody);
        }
        System.out.println("verified " + conn.getCipherSuite() + " " + rspBody);
    }

    static String sign(String content, PrivateKey key) throws Exception {
        Signature s = Signature.getInstance("SHA256withRSA");
        s.initSign(key);
        s.update(content.getBytes(StandardCharsets.UTF_8));
        return Base64.getEncoder().encodeToString(s.sign());
    }

    static String read(String file) throws Exception {
        return new String(Files.readAllBytes(Paths.get(file)), StandardCharsets.US_ASCII).trim();
    }

    static void fail(String msg) {
        System.err.println(msg);
        System.exit(1);
    }
}
