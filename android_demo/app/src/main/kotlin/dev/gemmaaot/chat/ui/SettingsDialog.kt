package dev.gemmaaot.chat.ui

import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.width
import androidx.compose.material3.AlertDialog
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Switch
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.unit.dp
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import dev.gemmaaot.chat.ChatViewModel

/** Sampler settings; the core validates them (SamplerSettings.parse) and names each problem. */
@Composable
fun SettingsDialog(model: ChatViewModel, onClose: () -> Unit) {
    val current by model.settings.collectAsStateWithLifecycle()
    val gpuNow by model.useGpu.collectAsStateWithLifecycle()
    var temperature by remember { mutableStateOf(current.temperature.toString()) }
    var topK by remember { mutableStateOf(current.topK.toString()) }
    var topP by remember { mutableStateOf(current.topP.toString()) }
    var maxTokens by remember { mutableStateOf(current.maxNewTokens.toString()) }
    var gpu by remember { mutableStateOf(gpuNow) }
    var problems by remember { mutableStateOf(emptyList<String>()) }
    AlertDialog(
        onDismissRequest = onClose,
        title = { Text("Settings") },
        text = {
            Column {
                OutlinedTextField(temperature, { temperature = it }, label = { Text("Temperature (0 = greedy)") })
                OutlinedTextField(topK, { topK = it }, label = { Text("Top-k") })
                OutlinedTextField(topP, { topP = it }, label = { Text("Top-p") })
                OutlinedTextField(maxTokens, { maxTokens = it }, label = { Text("Max new tokens") })
                Row(verticalAlignment = Alignment.CenterVertically) {
                    Switch(checked = gpu, onCheckedChange = { gpu = it })
                    Spacer(Modifier.width(8.dp))
                    Text("Use GPU (reloads; falls back to CPU)")
                }
                for (p in problems) Text(p, color = MaterialTheme.colorScheme.error)
            }
        },
        confirmButton = {
            TextButton(onClick = {
                problems = model.applySettings(temperature, topK, topP, maxTokens, gpu)
                if (problems.isEmpty()) onClose()
            }) { Text("Apply") }
        },
        dismissButton = { TextButton(onClick = onClose) { Text("Cancel") } })
}
