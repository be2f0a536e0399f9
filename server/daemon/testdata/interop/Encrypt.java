// Encrypts as Java programs do with the JCE (SunJCE) defaults, for
// keyissuer's interop tests (server/daemon/interop_test.go). Run as
// `java Encrypt.java`. Each input line is "SCHEME PUBLIC_KEY_B64
// PLAINTEXT_B64", where SCHEME is a Cipher transformation, or
// "RSA/ECB/OAEPPadding+SHA-256" for OAEPPadding with explicit SHA-256 and
// MGF1-SHA-256 parameters; each output line is "SCHEME CIPHERTEXT_B64".
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.security.KeyFactory;
import java.security.PublicKey;
import java.security.spec.MGF1ParameterSpec;
import java.security.spec.X509EncodedKeySpec;
import java.util.Base64;
import javax.crypto.Cipher;
import javax.crypto.spec.OAEPParameterSpec;
import javax.crypto.spec.PSource;

public class Encrypt {
    public static void main(String[] args) throws Exception {
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        StringBuilder out = new StringBuilder();
        for (String line; (line = in.readLine()) != null; ) {
            if (line.isBlank()) {
                continue;
            }
            String[] f = line.trim().split(" ");
            PublicKey key = KeyFactory.getInstance("RSA")
                .generatePublic(new X509EncodedKeySpec(Base64.getDecoder().decode(f[1])));
            byte[] pt = Base64.getDecoder().decode(f[2]);
            Cipher c;
            if (f[0].equals("RSA/ECB/OAEPPadding+SHA-256")) {
                c = Cipher.getInstance("RSA/ECB/OAEPPadding");
                c.init(Cipher.ENCRYPT_MODE, key, new OAEPParameterSpec(
                    "SHA-256", "MGF1", MGF1ParameterSpec.SHA256, PSource.PSpecified.DEFAULT));
            } else {
                c = Cipher.getInstance(f[0]);
                c.init(Cipher.ENCRYPT_MODE, key);
            }
            out.append(f[0]).append(' ')
                .append(Base64.getEncoder().encodeToString(c.doFinal(pt))).append('\n');
        }
        System.out.print(out);
    }
}
