package dev.gemmaaot.core

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import kotlin.io.path.createTempDirectory
import kotlin.test.Test
import kotlin.test.assertEquals
import kotlin.test.assertIs
import kotlin.test.assertTrue

/** Runs on a bundle our exporter wrote (-Dlitertlm=PATH; tests/test_android_demo.py passes it). */
class LitertlmFileTest {
    private val bundle = File(System.getProperty("litertlm") ?: error("run with -Dlitertlm=PATH"))
    private val tmp = createTempDirectory("litertlm").toFile()

    private fun invalid(f: File): String = assertIs<LitertlmFile.Check.Invalid>(LitertlmFile.check(f)).reason

    private fun copy(name: String, edit: (ByteArray) -> ByteArray) =
        File(tmp, name).also { it.writeBytes(edit(bundle.readBytes())) }

    @Test
    fun ourBundleHasEverythingTheEngineNeeds() {
        val ok = assertIs<LitertlmFile.Check.Ok>(LitertlmFile.check(bundle))
        assertTrue(ok.version.startsWith("1."), ok.version)
        val types = ok.sections.map { it.type }
        assertTrue("TFLiteModel" in types && "SP_Tokenizer" in types && "LlmMetadataProto" in types,
                   types.toString())
        assertEquals("tf_lite_prefill_decode", ok.section("TFLiteModel")!!.items["model_type"])
        assertEquals(bundle.length(), ok.bytes)
        for (s in ok.sections) assertTrue(s.begin % (16 * 1024) == 0L && s.end <= ok.bytes, s.toString())
    }

    @Test
    fun truncatedCopyIsNamedAsSuch() {
        val cut = copy("cut.litertlm") { it.copyOf(it.size - 1000) }
        val why = invalid(cut)
        assertTrue(why.startsWith("cut.litertlm: section ") && why.endsWith("(truncated or corrupt)"), why)
        assertTrue(invalid(copy("tiny.litertlm") { it.copyOf(20) }).contains("too short for a .litertlm file"))
        val header = copy("head.litertlm") { it.copyOf(64) }
        assertTrue(invalid(header).contains(": header ends at byte "), invalid(header))
    }

    @Test
    fun foreignFilesAndVersions() {
        val tflite = File(System.getProperty("tflite") ?: error("run with -Dtflite=PATH"))
        val why = invalid(tflite)
        assertTrue(why.endsWith("(it is a bare .tflite model: push the .litertlm bundle instead)"), why)
        val gguf = File(tmp, "m.gguf").also { it.writeBytes("GGUF".toByteArray() + ByteArray(60)) }
        assertEquals("m.gguf is not a .litertlm file: it starts with 'GGUF\\x00\\x00\\x00\\x00', not 'LITERTLM'",
                     invalid(gguf))
        val v2 = copy("v2.litertlm") { b ->
            b.copyOf().also { ByteBuffer.wrap(it).order(ByteOrder.LITTLE_ENDIAN).putInt(8, 2) } }
        assertTrue(invalid(v2).startsWith("v2.litertlm is .litertlm format 2."), invalid(v2))
        assertEquals("no file at ${tmp.path}/absent.litertlm", invalid(File(tmp, "absent.litertlm")))
    }

    @Test
    fun locatorPrefersTheDefaultNameThenTheNewest() {
        val dir = File(tmp, "models").also { it.mkdirs() }
        assertIs<ModelLocator.Found.NoModel>(ModelLocator.find(listOf(dir)))
        val older = File(dir, "other.litertlm").also { bundle.copyTo(it); it.setLastModified(1_000_000) }
        val newer = File(dir, "newer.litertlm").also { bundle.copyTo(it); it.setLastModified(2_000_000) }
        File(dir, "notes.txt").writeText("x")
        assertEquals(listOf(newer, older), ModelLocator.candidates(listOf(dir)))
        val preferred = File(dir, ModelLocator.DEFAULT_NAME).also { bundle.copyTo(it); it.setLastModified(0) }
        val found = assertIs<ModelLocator.Found.Model>(ModelLocator.find(listOf(dir)))
        assertEquals(preferred, found.file)
        assertIs<LitertlmFile.Check.Ok>(found.check)
        assertEquals("adb push gemma3-270m-int8.litertlm /sdcard/Android/data/x/files/gemma3-270m-int8.litertlm",
                     ModelLocator.pushCommand("/sdcard/Android/data/x/files"))
    }
}
